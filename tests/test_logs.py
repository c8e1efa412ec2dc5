"""Log lines: key=value text that parses back, JSON lines, camera failures at WARNING, and
no credentials in either format, down to the real daemon's own output."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from streamd.logs import setup_logging
from streamd.redact import register_url
from tests.fixtures_daemon import free_tcp_port, wait_until

# A logfmt reader: bare values, or double-quoted ones with JSON escapes.
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
PASSWORD = 'Hunter2"pa ss\\word'          # a quote, a space and a backslash: escaping must not hide it
CAMERA_URL = "rtsp://viewer:{}@127.0.0.1:{}/live"


def parse_fields(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(line)}


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield root
    root.handlers[:], level = saved
    root.setLevel(level)


def test_text_values_with_spaces_quotes_and_equals_parse_back(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    fields: dict[str, Any] = {"camera": "door", "reason": "no route to host; retry in 1.0s",
                              "quoted": 'say "hi"', "eq": "a=b", "slash": "back\\slash", "empty": "",
                              "newline": "two\nlines", "accent": "café", "count": 3}
    logging.getLogger("streamd.test").warning("camera state", extra=fields)
    line = out.getvalue()
    assert line.count("\n") == 1, line                 # one line, even with a newline in a value
    assert " WARNING streamd.test: camera state camera=door " in line
    assert parse_fields(line) == {k: str(v) for k, v in fields.items()}


def test_json_lines_carry_time_level_logger_message_and_fields(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    log = logging.getLogger("streamd.test")
    log.info("model %s loaded", "m.onnx", extra={"camera": "door", "frames": 12, "ok": True})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(x) for x in out.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["level"], first["logger"], first["message"]) == ("info", "streamd.test", "model m.onnx loaded")
    assert (first["camera"], first["frames"], first["ok"]) == ("door", 12, True)
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_format_lets_a_camera_password_through(root_logger: logging.Logger, fmt: str) -> None:
    url = CAMERA_URL.format(PASSWORD, 8554)
    register_url(url)
    out = io.StringIO()
    setup_logging("info", fmt, stream=out)
    log = logging.getLogger("streamd.test")
    log.warning("opening %s", url, extra={"camera": "door", "reason": f"cannot open {url}"})
    try:
        raise OSError(f"connect {url} failed")
    except OSError:
        log.exception("camera thread failed", extra={"camera": "door"})
    text = out.getvalue()
    assert "viewer" not in text and "Hunter2" not in text and "pa ss" not in text, text
    assert text.count("rtsp://***@127.0.0.1:8554/live") >= 3, text


def run_daemon(model: Path, tmp_path: Path, name: str, log_cfg: dict[str, str], args: list[str],
               port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """A daemon whose only camera refuses connections (a free port nobody listens on)."""
    cfg = {
        "model": {"path": str(model)},
        "scheduler": {"autotune_s": 0, "workers": 1},
        "publisher": {"endpoint": f"tcp://127.0.0.1:{free_tcp_port()}"},
        "sources": {"open_timeout_s": 2, "read_timeout_s": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
        "metrics": {"enabled": False},
        "cameras": [{"id": "door", "url": CAMERA_URL.format("${DOOR_PW}", port)}],
        "log": log_cfg,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamd.cli", "run", "-c", str(path), *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]),
                                     "DOOR_PW": PASSWORD, "PYTHONUNBUFFERED": "1"})
    return proc, log_path


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_the_daemon_logs_camera_failures_at_warning_in_both_formats(yolov8n_onnx_320: Path,
                                                                    tmp_path: Path) -> None:
    port = free_tcp_port()
    # log.format in the config, and --log-format overriding it
    as_json, json_log = run_daemon(yolov8n_onnx_320, tmp_path, "json", {"format": "json"}, [], port)
    as_text, text_log = run_daemon(yolov8n_onnx_320, tmp_path, "text", {"format": "json"},
                                   ["--log-format", "text"], port)
    try:
        def reconnecting_json() -> dict[str, Any] | None:
            lines = json_log.read_text().split("\n")[:-1]     # whole lines only: it is being written
            objs = [json.loads(x) for x in lines]              # every line is one JSON object
            return next((o for o in objs if o.get("state") == "reconnecting"), None)

        def reconnecting_text() -> str | None:
            return next((x for x in text_log.read_text().splitlines() if "state=reconnecting" in x), None)

        event = wait_until(reconnecting_json, 60, what="a reconnecting line in the JSON log")
        line = wait_until(reconnecting_text, 60, what="a reconnecting line in the text log")
    finally:
        stop(as_json)
        stop(as_text)
    assert event["level"] == "warning" and event["logger"] == "streamd.source" and event["camera"] == "door"
    assert "retry in" in event["reason"]
    assert " WARNING streamd.source: " in line
    fields = parse_fields(line)
    assert fields["camera"] == "door" and "retry in" in fields["reason"], line
    for log_path in (json_log, text_log):
        text = log_path.read_text()
        assert "Hunter2" not in text and "viewer" not in text, text
        assert "rtsp://***@127.0.0.1" in text


def test_decode_errors_are_counted_each_and_warned_once_a_while(caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from streamd.config import CameraConfig, SourceDefaults
    from streamd.pipeline.queues import RingQueue
    from streamd.pipeline.sources.camera import CameraSource
    source = CameraSource(CameraConfig(id="door", url="rtsp://192.0.2.10/x"), SourceDefaults(),
                          RingQueue(1, threading.Condition()), lambda *_: None)
    with caplog.at_level(logging.INFO, logger="streamd.source"):
        for _ in range(5):
            source._decode_error("broken frame")
    assert source.stats.decode_errors == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]      # a broken stream can't flood
    assert (warnings[0].camera, warnings[0].error, warnings[0].count) == ("door", "broken frame", 1)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_under_journald_each_line_carries_its_priority(root_logger: logging.Logger, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    with open(tmp_path / "journal", "w+") as journal, open(tmp_path / "other", "w+") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")   # as systemd sets it
        for stream in (journal, other):
            setup_logging("debug", fmt, stream=stream)
            log = logging.getLogger("streamd.test")
            log.debug("d")
            log.info("i")
            log.warning("camera state", extra={"camera": "door", "state": "lost"})
            log.error("e")
            stream.flush()
        prefixes = [line[:3] for line in (tmp_path / "journal").read_text().splitlines()]
        assert prefixes == ["<7>", "<6>", "<4>", "<3>"]
        assert not any(line.startswith("<") for line in (tmp_path / "other").read_text().splitlines())
