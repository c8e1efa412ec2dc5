"""``streamd sub``: print what a daemon publishes, one line per message, and report gaps.

Gaps are tracked per publisher id (a restarted daemon starts a new sequence, which is
reported as a restart, not as a loss). With ``--camera`` the per-camera ``cam_seq`` is
used, since the publisher-wide ``seq`` skips every other camera's messages by design.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

import zmq

from .. import protocol
from ..security import CurveKeys, KeyFileError, apply_client, load_key_file, load_secret_key_file


@dataclass
class GapTracker:
    per_camera: bool
    last: dict[tuple[str, str], int] = field(default_factory=dict)
    missing: int = 0

    def check(self, body: dict[str, Any]) -> str | None:
        """Return a gap or restart notice for this message, or None."""
        pub = str(body.get("pub", "?"))
        if self.per_camera:
            if "cam_seq" not in body:
                return None
            key, seq = (pub, str(body.get("camera"))), int(body["cam_seq"])
        else:
            key, seq = (pub, ""), int(body["seq"])
        notice = None
        prev = self.last.get(key)
        if prev is None:
            if not any(k[1] == key[1] and k[0] != pub for k in self.last):
                notice = None
            else:
                notice = f"publisher restarted (new id {pub})"
        elif seq > prev + 1:
            n = seq - prev - 1
            self.missing += n
            notice = f"GAP: {n} message(s) missing before seq {seq}" + (f" of camera {key[1]}" if key[1] else "")
        elif seq <= prev:
            notice = f"sequence went back from {prev} to {seq} (duplicate or reordered)"
        self.last[key] = max(seq, prev or 0)
        return notice


def curve_client_keys(server_key: Path | str | None,
                      client_key: Path | str | None) -> tuple[bytes, CurveKeys] | None:
    """(server public key, client key pair) for a CURVE connection, or None for plain.

    ``server_key`` is the server's ``.key`` file, ``client_key`` this client's ``.key_secret``
    file; a CURVE server admits only clients whose public key it lists."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise KeyFileError("CURVE needs both the server's public key and this client's secret key file")
    return load_key_file(server_key).public, load_secret_key_file(client_key)


def subscribe(endpoint: str, cameras: list[str] | None = None, timeout_s: float | None = None,
              context: zmq.Context | None = None, rcvhwm: int = 100000,
              until: float | None = None, server_key: Path | str | None = None,
              client_key: Path | str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield decoded messages until ``timeout_s`` passes with none (None: forever), or
    until the monotonic time ``until``, whichever comes first."""
    curve = curve_client_keys(server_key, client_key)
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.LINGER, 0)
    if cameras:
        for c in cameras:
            sock.setsockopt(zmq.SUBSCRIBE, protocol.camera_prefix(c))
        sock.setsockopt(zmq.SUBSCRIBE, protocol.SYSTEM_PREFIX)
    else:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if curve is not None:
        apply_client(sock, *curve)
    sock.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if until is not None and now >= until:
                return
            if timeout_s is not None and now - last >= timeout_s:
                return
            if not poller.poll(200):
                continue
            last = time.monotonic()
            parts = sock.recv_multipart()
            try:
                yield protocol.decode(parts)
            except protocol.ProtocolError as exc:
                yield "!invalid", {"type": "invalid", "error": str(exc)}
    finally:
        sock.close(0)


def format_line(topic: str, body: dict[str, Any]) -> str:
    t = body.get("type")
    ts = time.strftime("%H:%M:%S", time.localtime(body.get("publish_ts", time.time())))
    seq = body.get("seq", "?")
    if t == protocol.TYPE_DETECTIONS:
        age_ms = 1000 * (body["publish_ts"] - body["capture_ts"])
        # A tracked object's id follows its label: person#12:0.87@...
        dets = " ".join(f"{d['label']}{_track(d)}:{d['confidence']:.2f}@{','.join(str(int(v)) for v in d['box'])}"
                        for d in body["detections"]) or "-"
        return (f"{ts} seq={seq} cam={body['camera']} frame={body['frame']} "
                f"{body['width']}x{body['height']} age={age_ms:.0f}ms n={len(body['detections'])} {dets}")
    if t == protocol.TYPE_HEALTH:
        return (f"{ts} seq={seq} cam={body['camera']} HEALTH {body['previous']} -> {body['state']}"
                f" ({body.get('reason') or '-'})")
    if t == protocol.TYPE_EVENT:
        zones = ",".join(f"{z}:{s:.1f}s" for z, s in body.get("zones", {}).items()) or "-"
        why = f" reason={body['reason']}" if body.get("reason") else ""
        return (f"{ts} seq={seq} cam={body['camera']} EVENT {body['event']} {body['label']}#{body['track_id']}"
                f" for {body['duration_s']:.1f}s best={body['best']['confidence']:.2f} zones={zones}{why}")
    if t == protocol.TYPE_HEARTBEAT:
        return f"{ts} seq={seq} heartbeat host={body.get('host')} pid={body.get('pid')}"
    if t == protocol.TYPE_STATS:
        cams = body.get("cameras", {})
        summary = " ".join(f"{c}:{v['state']}/{v['published']}" for c, v in cams.items())
        return f"{ts} seq={seq} stats uptime={body.get('uptime_s')}s {summary}"
    return f"{ts} {topic} {json.dumps(body)}"


def _track(det: dict[str, Any]) -> str:
    return f"#{det['track_id']}" if det.get("track_id") is not None else ""


def save_snapshot(body: dict[str, Any], folder: Path) -> Path | None:
    """Write the message's snapshot with its detections drawn: ``<camera>.jpg`` (latest); an
    object's ``end`` event's best frame as it came: ``<camera>-object<track id>.jpg``."""
    import cv2
    import numpy as np

    from ..annotate import draw
    if body.get("type") == protocol.TYPE_EVENT:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{body['camera']}-object{int(body['track_id'])}.jpg"
        tmp = path.with_suffix(".tmp.jpg")
        tmp.write_bytes(body["_snapshot"])
        tmp.replace(path)
        return path
    img = cv2.imdecode(np.frombuffer(body["_snapshot"], np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    title = f"{body['camera']} frame {body['frame']}: {len(body['detections'])} detections"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{body['camera']}.jpg"
    tmp = path.with_suffix(".tmp.jpg")
    cv2.imwrite(str(tmp), draw(img, body["detections"], title))
    tmp.replace(path)   # readers never see half a picture
    return path


def run_sub(endpoint: str, cameras: list[str] | None, as_json: bool, count: int | None,
            timeout_s: float | None, out: TextIO = sys.stdout, snapshot_dir: Path | None = None,
            server_key: Path | None = None, client_key: Path | None = None) -> int:
    gaps = GapTracker(per_camera=bool(cameras))
    n = 0
    received = 0
    for topic, body in subscribe(endpoint, cameras, timeout_s, server_key=server_key, client_key=client_key):
        received += 1
        if snapshot_dir is not None and "_snapshot" in body:
            save_snapshot(body, snapshot_dir)
        snapshot = body.pop("_snapshot", None)
        if snapshot is not None and as_json:
            body["snapshot"]["bytes"] = len(snapshot)
        if body.get("type") == "invalid":
            print(f"!! invalid message: {body['error']}", file=out, flush=True)
            continue
        notice = gaps.check(body)
        if notice:
            print(f"!! {notice}", file=out, flush=True)
        print(json.dumps({"topic": topic, **body}) if as_json else format_line(topic, body), file=out, flush=True)
        if body.get("type") == protocol.TYPE_DETECTIONS:
            n += 1
            if count is not None and n >= count:
                break
    if gaps.missing:
        print(f"!! {gaps.missing} message(s) missed in total", file=out, flush=True)
    if not received and timeout_s is not None:
        # Like `streamd status`: a script must be able to tell "nothing came" from success.
        print(f"no message from {endpoint} within {timeout_s:g} s: is streamd running there?",
              file=sys.stderr, flush=True)
        return 1
    return 0
