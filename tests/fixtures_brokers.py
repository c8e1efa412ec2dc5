"""Real Mosquitto and Redis servers on free loopback ports, each with its own config and
folder, stopped by PID. Tests import the fixtures they use from here.

    mosquitto_factory(password=None, tls=False, persistent=False)  -> Mosquitto (start()/stop() again on the same port)
    redis_factory(**redis_options)    -> RedisServer
    MqttRecorder(port, topics)        -> a paho subscriber keeping every message it got
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.fixtures_daemon import free_tcp_port, wait_until

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
REDIS_SERVER = shutil.which("redis-server")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Server:
    """A broker process in its own session, started and stopped by PID."""

    def __init__(self, argv: list[str], port: int, workdir: Path, name: str) -> None:
        self.argv, self.port, self.workdir, self.name = argv, port, workdir, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or _port_open(self.port), timeout,
                   what=f"{self.name} to listen on port {self.port}")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited at start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        wait_until(lambda: not _port_open(self.port), 5, what=f"{self.name} port {self.port} to close")


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 it signed (openssl, EC keys)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=streamd test CA")
    ssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    return {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}


class Mosquitto(_Server):
    def __init__(self, workdir: Path, password: tuple[str, str] | None = None, tls: bool = False,
                 persistent: bool = False) -> None:
        port = free_tcp_port()
        # user: run as whoever runs the tests (as root mosquitto would switch to a 'mosquitto'
        # user that cannot read the test's folder). persistent: sessions and retained messages
        # survive a restart (saved in workdir when the broker stops).
        lines = [f"listener {port} 127.0.0.1", f"user {getpass.getuser()}", "log_dest stdout", "log_type all",
                 f"persistence {'true' if persistent else 'false'}", f"persistence_location {workdir}/"]
        if password is not None:
            pwfile = workdir / "passwd"
            pwfile.write_text(f"{password[0]}:{password[1]}\n")
            pwfile.chmod(0o600)
            # mosquitto_passwd -U hashes the plain-text file in place, as a broker admin would.
            subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines += ["allow_anonymous true"]
        self.tls_files = make_tls_files(workdir) if tls else None
        if self.tls_files is not None:
            lines += [f"cafile {self.tls_files['ca']}", f"certfile {self.tls_files['cert']}",
                      f"keyfile {self.tls_files['key']}"]
        conf = workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        assert MOSQUITTO is not None
        super().__init__([MOSQUITTO, "-c", str(conf)], port, workdir, "mosquitto")


class RedisServer(_Server):
    def __init__(self, workdir: Path, **options: Any) -> None:
        port = free_tcp_port()
        argv = [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--daemonize", "no"]
        for k, v in options.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        super().__init__(argv, port, workdir, "redis")
        self.url = f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (tools/setup_system.sh installs it)")
    made: list[Mosquitto] = []

    def make(password: tuple[str, str] | None = None, start: bool = True, tls: bool = False,
             persistent: bool = False) -> Mosquitto:
        d = tmp_path / f"mosquitto{len(made)}"
        d.mkdir()
        m = Mosquitto(d, password, tls, persistent)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (tools/setup_system.sh installs it)")
    made: list[RedisServer] = []

    def make(start: bool = True, **options: Any) -> RedisServer:
        d = tmp_path / f"redis{len(made)}"
        d.mkdir()
        r = RedisServer(d, **options)
        made.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in made:
        r.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        import json
        return json.loads(self.payload)


class MqttRecorder:
    """A real MQTT subscriber (paho, its own network thread) that keeps what it receives."""

    def __init__(self, port: int, topics: list[str], username: str | None = None,
                 password: str | None = None, session: str | None = None) -> None:
        """``session``: a client id with a persistent session, so the broker keeps (QoS 1)
        messages for this subscriber while it is not connected."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=session or f"test-{time.monotonic_ns()}",
                                  clean_session=session is None)
        if username is not None:
            self.client.username_pw_set(username, password)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            client.subscribe([(t, 1) for t in topics])

        def on_subscribe(*args: Any) -> None:
            self._subscribed.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self._lock:
                self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), time.monotonic()))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("test subscriber could not subscribe")

    def of(self, pred: Callable[[Received], bool] = lambda m: True) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if pred(m)]

    def on(self, topic: str) -> list[Received]:
        return self.of(lambda m: m.topic == topic)

    def wait_for(self, pred: Callable[[Received], bool], timeout: float, what: str) -> Received:
        return wait_until(lambda: next(iter(self.of(pred)), None), timeout, what=what)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_recorder() -> Iterator[Callable[..., MqttRecorder]]:
    """Factory: ``mqtt_recorder(port, ["topic/#"], username=..., password=...)``; all closed at the end."""
    with ExitStack() as stack:
        yield lambda port, topics, **kw: stack.enter_context(closing(MqttRecorder(port, topics, **kw)))
