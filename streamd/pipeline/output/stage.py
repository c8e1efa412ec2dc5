"""The output stage: the scheduler's post thread hands it results; tracked cameras' results
go through their tracker (track ids, object events), then it builds the messages (with
snapshots where cameras want them), answers requests through their front door, and offers
every message to each transport. Nothing here waits on a network: transports queue and drop
(counted) rather than block.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

from ...config import Config
from ...entities import Frame, FrameResult, RequestResult
from ...outputs.base import Outbound, Output
from .messages import detections_message, health_message, request_result_body, request_result_message
from .objects import TrackedObjects
from .snapshots import SnapshotPolicy

log = logging.getLogger("streamd.output")

# Sees each frame with its result (the live view keeps the newest); returns at once.
FrameTap = Callable[[FrameResult, Frame], None]


class OutputStage:
    """Implements the scheduler's ``ResultSink``; also the cameras' health callback."""

    def __init__(self, outputs: Sequence[Output], snapshots: SnapshotPolicy, age_bound: Callable[[], float],
                 observe: Callable[[list[FrameResult]], None] | None = None,
                 objects: TrackedObjects | None = None, taps: Sequence[FrameTap] = ()) -> None:
        self.outputs = list(outputs)
        self.taps = list(taps)
        self.snapshots = snapshots
        self.objects = objects
        self._age_bound = age_bound          # seconds; the scheduler's current frame-age bound
        self._observe = observe or (lambda results: None)

    def results(self, results: list[FrameResult], frames: list[Frame]) -> None:
        bound = self._age_bound()
        tracked = []
        for r, f in zip(results, frames):
            events: list[Outbound] = []
            if self.objects is not None:
                r, events = self.objects.frame(r, f)
            tracked.append(r)
            self.fan_out(detections_message(r, bound, self.snapshots.take(r, f)))
            for tap in self.taps:
                tap(r, f)
            self.fan_out_all(events)
        self._observe(tracked)

    def request_results(self, results: list[RequestResult]) -> None:
        for rr in results:
            body = request_result_body(rr)
            # The front door gets its own copy; published only if this was the one answer
            # (a request its front door already timed out is not published late).
            if rr.request.reply_to.answer(rr, dict(body)):
                self.fan_out(request_result_message(rr, body))

    def health(self, camera_id: str, state: str, previous: str, reason: str, decoder: int | None = None) -> None:
        self.fan_out(health_message(camera_id, state, previous, reason, decoder))
        if self.objects is not None:
            self.fan_out_all(self.objects.camera_state(camera_id, state))

    def reconfigure(self, cfg: Config, restarted: Iterable[str]) -> None:
        """A reload's new tracking settings and zones (before cameras are stopped or started)."""
        if self.objects is not None:
            self.fan_out_all(self.objects.reconfigure(cfg, restarted))

    def shutting_down(self) -> None:
        if self.objects is not None:
            self.objects.shutting_down()

    def close(self) -> None:
        """After the pipeline drained, before the transports close: the objects still alive end."""
        if self.objects is not None:
            self.fan_out_all(self.objects.close())

    def fan_out_all(self, msgs: list[Outbound]) -> None:
        for msg in msgs:
            self.fan_out(msg)

    def fan_out(self, msg: Outbound) -> None:
        for out in self.outputs:
            try:
                out.offer(msg)
            except Exception:  # noqa: BLE001 - one broken transport must not silence the others
                log.exception("output %s refused a %s message", out.name, msg.kind)
