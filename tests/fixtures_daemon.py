"""Run the real daemon as a real process and read its real PUB socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
import zmq

from streamd import protocol

REPO = Path(__file__).resolve().parents[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy or the deadline; fail the test with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Collector:
    """A SUB socket on its own thread, keeping every decoded message with its receive time."""

    def __init__(self, endpoint: str, prefixes: list[bytes] | None = None, rcvhwm: int = 100000) -> None:
        self.endpoint = endpoint
        self.messages: list[tuple[str, dict[str, Any], float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        for p in prefixes or [b""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, p)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="test-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                parts = self._sock.recv_multipart()
                topic, body = protocol.decode(parts)
                with self._lock:
                    self.messages.append((topic, body, time.time()))

    def of(self, type_: str | None = None, camera: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [b for _, b, _ in self.messages
                    if (type_ is None or b["type"] == type_) and (camera is None or b.get("camera") == camera)]

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self._lock:
                return next((b for _, b, _ in self.messages if pred(b)), None)
        return wait_until(find, timeout, what=what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


class DaemonProcess:
    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = workdir / "streamd.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "daemon.log"
        self.endpoint = config.get("publisher", {}).get("endpoint", "tcp://127.0.0.1:5555")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamd.cli", "run", "-c", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL and fail if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"daemon did not stop within {timeout}s of SIGTERM:\n{self.log()[-3000:]}")
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(endpoint: str, prefixes: list[bytes] | None = None, **kw: Any) -> Collector:
        c = Collector(endpoint, prefixes, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def pub_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"
