"""The data path from cameras to detections.

``sources`` decode cameras into per-camera ring ``queues``; on-demand pictures wait in the
``requests`` queue. The ``scheduler`` batches both (``batching``, ``preprocess``) for the
backend pool and turns its outputs into detections (``postprocess``) for the ``output``
stage, which builds the messages and hands them to every transport. Results only flow forward.
"""
