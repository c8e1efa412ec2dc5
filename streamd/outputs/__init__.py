"""What leaves the box: the ZeroMQ PUB socket (``zmq_publisher``)."""
