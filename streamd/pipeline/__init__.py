"""The data path from cameras to detections.

``sources`` decode cameras into per-camera ring ``queues``; the ``scheduler`` batches their
newest frames (``preprocess``) for the backend pool and turns its outputs into detections
(``postprocess``) for the output stage.
"""
