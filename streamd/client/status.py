"""``streamd status``: read one ``stats`` message off the PUB socket and print it as a table.

It only listens: the daemon needs no extra port, and anyone who may subscribe may look.
The daemon sends stats every ``publisher.stats_interval_s``, so the wait has to be
longer than that.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

import zmq

from .. import protocol

_COLUMNS = (
    # (header, right-aligned)
    ("CAMERA", False), ("STATE", False), ("DECODED", True), ("SKIPPED", True), ("INFERRED", True),
    ("PUBLISHED", True),
    ("DROPS q/old/cap", True), ("ERRORS bad/corrupt", True), ("RECONN", True), ("QUEUE", True),
    ("RESOLUTION", False), ("OBJECTS live/total", True),
)


def _int(value: Any) -> str:
    # Fields may be missing in a body from an older or newer daemon: show "-", don't fail.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def format_uptime(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def _camera_row(cid: str, c: Mapping[str, Any]) -> list[str]:
    d = c.get("dropped") or {}
    w, h = c.get("width"), c.get("height")
    res = f"{w}x{h}" if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else "-"
    return [cid, str(c.get("state", "-")), _int(c.get("decoded")), _int(c.get("skipped")), _int(c.get("inferred")),
            _int(c.get("published")),
            "/".join(_int(d.get(k)) for k in ("queue_full", "too_old", "fps_cap")),
            f"{_int(c.get('decode_errors'))}/{_int(c.get('corrupt_frames'))}",
            _int(c.get("reconnects")), _int(c.get("queue_depth")), res, _objects(c.get("objects"))]


def _objects(objects: Any) -> str:
    # "-" for a camera without a tracker; tracker failures, rare, only when there were any.
    if not isinstance(objects, Mapping):
        return "-"
    cell = f"{_int(objects.get('live'))}/{_int(objects.get('total'))}"
    errors = objects.get("errors")
    return f"{cell} ({_int(errors)} failed)" if isinstance(errors, int) and errors > 0 else cell


def format_status(stats_body: Mapping[str, Any]) -> str:
    """One ``stats`` message body (or a ``Daemon.stats()`` dict) as a fixed-width table."""
    lines: list[str] = []
    pub = stats_body.get("pub")
    ts = stats_body.get("publish_ts")
    if pub is not None or ts is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "-"
        lines.append(f"streamd {pub or '-'}  stats of {when}  (seq {stats_body.get('seq', '-')})")

    cams: Mapping[str, Mapping[str, Any]] = stats_body.get("cameras") or {}
    rows = [[h for h, _ in _COLUMNS]] + [_camera_row(cid, c) for cid, c in cams.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    for r in rows:
        cells = [cell.rjust(w) if right else cell.ljust(w)
                 for cell, w, (_, right) in zip(r, widths, _COLUMNS)]
        lines.append("  ".join(cells).rstrip())
    if not cams:
        lines.append("(no cameras)")

    sched = stats_body.get("scheduler") or {}
    batches, frames = sched.get("batches"), sched.get("frames")
    mean_batch = f"{frames / batches:.2f}" if isinstance(batches, int) and batches > 0 \
        and isinstance(frames, (int, float)) else "-"
    infer = sched.get("infer_ms_mean")
    infer_s = f"{infer:.1f} ms" if isinstance(infer, (int, float)) else "-"
    p = stats_body.get("publisher") or {}
    lines.append("")
    lines.append(f"uptime {format_uptime(stats_body.get('uptime_s'))}   batches {_int(batches)}"
                 f"   mean batch {mean_batch}   inference {infer_s}/batch"
                 f"   publisher sent {_int(p.get('sent'))} dropped {_int(p.get('dropped'))}")
    workers, threads, bound = sched.get("workers"), sched.get("threads_per_worker"), sched.get("max_frame_age_ms")
    if isinstance(workers, int):
        per = sched.get("worker_batches") or {}
        lines.append(f"workers {workers} x {_int(threads) if threads else 'auto'} thread(s)"
                     f"   batches per worker {'/'.join(_int(per.get(str(i))) for i in range(workers))}"
                     f"   age bound {f'{bound:.0f} ms' if isinstance(bound, (int, float)) else '-'}")
    return "\n".join(lines)


def run_status(endpoint: str, timeout_s: float = 15.0, out: TextIO | None = None, err: TextIO | None = None,
               context: zmq.Context | None = None) -> int:
    """Wait up to ``timeout_s`` for one stats message on ``endpoint``, print it; 0 or 1."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, protocol.TOPIC_STATS)
    unreadable = 0
    last_problem = ""
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            print(f"cannot connect to {endpoint}: {exc}", file=err)
            return 1
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not sock.poll(max(1, int(left * 1000))):
                continue
            parts = sock.recv_multipart()
            try:
                _, body = protocol.decode(parts)
            except protocol.ProtocolError as exc:
                unreadable += 1
                last_problem = str(exc)
                continue
            if body.get("type") != protocol.TYPE_STATS:
                continue   # the prefix filter also passes any later sys/stats* topic
            print(format_status(body), file=out, flush=True)
            return 0
    finally:
        sock.close(0)
    msg = (f"no stats message from {endpoint} within {timeout_s:g} s: is streamd running, "
           f"and is publisher.stats_interval_s shorter than that?")
    if unreadable:
        # E.g. a daemon speaking another protocol version: say so rather than "nothing came".
        msg += f" ({unreadable} unreadable stats message(s): {last_problem})"
    print(msg, file=err, flush=True)
    return 1
