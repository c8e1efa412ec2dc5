"""What leaves the box: the ``Output`` interface every transport implements (``base``) and the
ZeroMQ PUB socket (``zmq_publisher``)."""
