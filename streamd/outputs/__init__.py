"""What leaves the box: the ZeroMQ PUB socket (``zmq_publisher``), MQTT (``mqtt``) and Redis
Streams (``redis_streams``), all behind the ``Output`` interface of ``base``."""
