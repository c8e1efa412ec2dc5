"""CurveZMQ on the PUB socket with real sockets on loopback: who gets in, who gets nothing,
key files, config errors, and the loopback rule."""

from __future__ import annotations

import io
import logging
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from streamd import protocol
from streamd.cli import keys as keys_cli
from streamd.config import CurveConfig, PublisherConfig, load_config
from streamd.errors import ConfigError, PublishError
from streamd.outputs.zmq_publisher import Publisher
from streamd.security import (CurveKeys, KeyFileError, apply_client, generate_key_files, load_allowed_keys,
                              load_key_file, load_secret_key_file)
from streamd.client.subscriber import run_sub
from tests.fixtures_daemon import REPO, free_tcp_port, wait_until
from tests.test_publisher import make_message

_HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_AUTH}


class ProbeSubscriber:
    """A SUB socket on its own thread that records messages and how its handshakes went.

    The monitor proves a refused client really reached the server and was turned away, so
    "received nothing" is not just "had not connected yet"."""

    def __init__(self, endpoint: str, server_key: bytes | None = None, client_keys: CurveKeys | None = None,
                 prefixes: list[bytes] | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.handshakes_ok = 0
        self.handshakes_failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        for p in prefixes or [b""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, p)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if server_key is not None and client_keys is not None:
            apply_client(self._sock, server_key, client_keys)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="test-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._sock in events:
                _, body = protocol.decode(self._sock.recv_multipart())
                with self._lock:
                    self.messages.append(body)
            if self._monitor in events:
                ev = recv_monitor_message(self._monitor)["event"]
                with self._lock:
                    if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self.handshakes_ok += 1
                    elif ev in _HANDSHAKE_FAILED:
                        self.handshakes_failed += 1

    def of(self, type_: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if m["type"] == type_]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, one allowed client (its .key in the allowed folder) and a stranger."""
    server_pub, server_sec, _ = generate_key_files(tmp_path / "server", "daemon")
    allowed_dir = tmp_path / "allowed"
    client_pub, client_sec, _ = generate_key_files(tmp_path / "clients", "viewer")
    allowed_dir.mkdir()
    (allowed_dir / client_pub.name).write_bytes(client_pub.read_bytes())
    _, stranger_sec, _ = generate_key_files(tmp_path / "strangers", "stranger")
    return {"server_pub": server_pub, "server_sec": server_sec, "allowed_dir": allowed_dir,
            "client_sec": client_sec, "stranger_sec": stranger_sec}


def curve_publisher(keys: dict[str, Path], host: str = "127.0.0.1", **kw: Any) -> Publisher:
    cfg = PublisherConfig(endpoint=f"tcp://{host}:{free_tcp_port()}", heartbeat_s=0.2,
                          curve=CurveConfig(server_secret_key=keys["server_sec"],
                                            allowed_clients_dir=keys["allowed_dir"]), **kw)
    pub = Publisher(cfg)
    pub.start()
    return pub


def loopback(endpoint: str) -> str:
    return endpoint.replace("//0.0.0.0:", "//127.0.0.1:")


def stop(pub: Publisher) -> None:
    pub.stop()
    pub.join(5)
    assert not pub.is_alive()


# ---- who gets in -------------------------------------------------------------------------------

def test_only_the_listed_client_key_receives(keys: dict[str, Path]) -> None:
    threads_before = set(threading.enumerate())
    pub = curve_publisher(keys)
    server_key = load_key_file(keys["server_pub"]).public
    allowed = ProbeSubscriber(pub.bound_endpoint, server_key, load_secret_key_file(keys["client_sec"]))
    no_key = ProbeSubscriber(pub.bound_endpoint)
    stranger = ProbeSubscriber(pub.bound_endpoint, server_key, load_secret_key_file(keys["stranger_sec"]))
    # A client that has the right key pair but trusts another server is refused too.
    wrong_server = ProbeSubscriber(pub.bound_endpoint, load_key_file(keys["client_sec"]).public,
                                   load_secret_key_file(keys["client_sec"]))
    refused = (no_key, stranger, wrong_server)
    try:
        wait_until(lambda: allowed.of("heartbeat"), 10, what="the allowed client's first heartbeat")
        wait_until(lambda: all(p.handshakes_failed for p in refused), 10,
                   what="every refused client to reach the server and fail its handshake")
        n = 0

        def feed() -> bool:
            nonlocal n
            n += 1
            pub.offer(make_message("door", n))
            return len(allowed.of("detections")) >= 20
        wait_until(feed, 20, interval=0.02, what="20 detections at the allowed client")
        assert allowed.handshakes_ok >= 1
        for p in refused:
            assert p.messages == [] and p.handshakes_ok == 0
        # The refused clients cost the allowed one nothing: no gap in its sequence.
        seqs = [m["seq"] for m in allowed.messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert pub.is_alive() and pub.error is None
    finally:
        for p in (allowed, *refused):
            p.close()
        stop(pub)
    # The ZAP handler's thread ends with the publisher.
    wait_until(lambda: set(threading.enumerate()) <= threads_before, 5, what="no thread left behind")


def test_subscribe_and_sub_command_connect_with_curve(keys: dict[str, Path]) -> None:
    pub = curve_publisher(keys)
    out = io.StringIO()
    t = threading.Thread(target=run_sub, args=(pub.bound_endpoint, ["door"], True, 3, 20, out),
                         kwargs={"server_key": keys["server_pub"], "client_key": keys["client_sec"]}, daemon=True)
    t.start()
    proc = subprocess.Popen([sys.executable, "-m", "streamd.cli", "sub", pub.bound_endpoint, "--json",
                             "--count", "2", "--timeout", "20", "--server-key", str(keys["server_pub"]),
                             "--client-key", str(keys["client_sec"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        n = 0

        def feed() -> bool:
            nonlocal n
            n += 1
            pub.offer(make_message("door", n))
            return not t.is_alive() and proc.poll() is not None
        wait_until(feed, 30, interval=0.1, what="the library and the CLI subscriber to get their detections")
        stdout, stderr = proc.communicate(timeout=5)
        assert proc.returncode == 0, stderr
        cli_dets = [line for line in stdout.splitlines() if '"type": "detections"' in line]
        lib_dets = [line for line in out.getvalue().splitlines() if '"type": "detections"' in line]
        assert len(cli_dets) == 2 and len(lib_dets) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        stop(pub)


def test_subscribe_needs_both_keys(keys: dict[str, Path]) -> None:
    from streamd.client.subscriber import subscribe
    with pytest.raises(KeyFileError, match="both"):
        next(subscribe("tcp://127.0.0.1:1", server_key=keys["server_pub"]))
    with pytest.raises(KeyFileError, match="no secret key"):
        next(subscribe("tcp://127.0.0.1:1", server_key=keys["server_pub"], client_key=keys["server_pub"]))


# ---- the loopback rule --------------------------------------------------------------------------

def test_non_loopback_without_curve_needs_the_opt_in(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"tcp://0.0.0.0:{free_tcp_port()}"
    with pytest.raises(PublishError, match=r"not a loopback address.*publisher\.curve.*allow_non_loopback"):
        Publisher(PublisherConfig(endpoint=endpoint))
    # Refused before binding: the port is still free.
    with socket.socket() as s:
        s.bind(("0.0.0.0", int(endpoint.rsplit(":", 1)[1])))
    with caplog.at_level(logging.INFO, logger="streamd.publisher"):
        pub = Publisher(PublisherConfig(endpoint=endpoint, allow_non_loopback=True))
        pub.close_socket()
    assert any(r.levelno == logging.WARNING and "not encrypted" in r.getMessage() for r in caplog.records)


def test_non_loopback_with_curve_needs_no_opt_in(keys: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    threads_before = set(threading.enumerate())
    with caplog.at_level(logging.INFO, logger="streamd.publisher"):
        pub = curve_publisher(keys, host="0.0.0.0")
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "streamd.publisher")
    assert any("with CURVE" in r.getMessage() for r in caplog.records)
    server_key = load_key_file(keys["server_pub"]).public
    # Reached over loopback only: nothing leaves the machine.
    probe = ProbeSubscriber(loopback(pub.bound_endpoint), server_key, load_secret_key_file(keys["client_sec"]))
    try:
        wait_until(lambda: probe.of("heartbeat"), 10, what="a heartbeat through the 0.0.0.0 CURVE socket")
    finally:
        probe.close()
        stop(pub)
    wait_until(lambda: set(threading.enumerate()) <= threads_before, 5, what="no thread left behind")


def test_publisher_that_never_started_leaves_no_thread(keys: dict[str, Path]) -> None:
    threads_before = set(threading.enumerate())
    cfg = PublisherConfig(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}",
                          curve=CurveConfig(server_secret_key=keys["server_sec"], allowed_clients_dir=keys["allowed_dir"]))
    pub = Publisher(cfg)
    assert set(threading.enumerate()) > threads_before       # the ZAP handler runs from bind on
    pub.close_socket()
    wait_until(lambda: set(threading.enumerate()) <= threads_before, 5, what="ZAP thread to end")


def test_publisher_refuses_bad_keys_at_bind(keys: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(CurveConfig(server_secret_key=keys["server_pub"], allowed_clients_dir=keys["allowed_dir"]),
              "no secret key"),
             (CurveConfig(server_secret_key=keys["server_sec"], allowed_clients_dir=empty), "no client public keys")]
    threads_before = set(threading.enumerate())
    for curve, words in cases:
        with pytest.raises(PublishError, match=words):
            Publisher(PublisherConfig(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", curve=curve))
    # A bind that fails after the ZAP handler started takes the handler down with it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        curve = CurveConfig(server_secret_key=keys["server_sec"], allowed_clients_dir=keys["allowed_dir"])
        with pytest.raises(PublishError, match="cannot bind"):
            Publisher(PublisherConfig(endpoint=f"tcp://127.0.0.1:{taken.getsockname()[1]}", curve=curve))
    wait_until(lambda: set(threading.enumerate()) <= threads_before, 5, what="no thread left behind")


# ---- key files ----------------------------------------------------------------------------------

def test_keys_generate_writes_a_zeromq_certificate_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "new" / "keys"
    assert keys_cli.main(["generate", "edge-01", "--dir", str(folder)]) == 0
    printed = capsys.readouterr().out
    pub_file, sec_file = folder / "edge-01.key", folder / "edge-01.key_secret"
    assert stat.S_IMODE(sec_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_file.stat().st_mode) == 0o644
    # Readable by pyzmq's own loader, so other ZeroMQ tools can use the same files.
    public, secret = zmq.auth.load_certificate(sec_file)
    assert zmq.auth.load_certificate(pub_file) == (public, None)
    assert secret is not None and zmq.curve_public(secret) == public
    assert public.decode() in printed and str(pub_file) in printed and str(sec_file) in printed
    assert "secret-key" not in pub_file.read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["edge-01.key", "edge-01.key_secret"]   # no temp files

    # Never overwritten by accident: the old pair keeps working for everyone who trusts it.
    before = (pub_file.read_bytes(), sec_file.read_bytes())
    assert keys_cli.main(["generate", "edge-01", "--dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err
    assert (pub_file.read_bytes(), sec_file.read_bytes()) == before
    sec_file.unlink()           # half a pair still blocks: the public file is someone's trust
    assert keys_cli.main(["generate", "edge-01", "--dir", str(folder)]) == 2
    assert "edge-01.key already exists" in capsys.readouterr().err

    assert keys_cli.main(["generate", "edge-01", "--dir", str(folder), "--force"]) == 0
    capsys.readouterr()
    new_public, _ = zmq.auth.load_certificate(sec_file)
    assert new_public != public and stat.S_IMODE(sec_file.stat().st_mode) == 0o600
    assert keys_cli.main(["generate", "../escape", "--dir", str(folder)]) == 2
    assert "key name" in capsys.readouterr().err


def test_keys_command_runs_as_a_process(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "streamd.cli.keys", "generate", "box", "--dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert load_secret_key_file(tmp_path / "box.key_secret").public.decode() in r.stdout


def test_key_loading_rejects_damaged_files(tmp_path: Path, keys: dict[str, Path]) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text('metadata\ncurve\n    public-key = "tooshort"\n')
    with pytest.raises(KeyFileError, match="Z85"):
        load_key_file(bad)
    bad.write_text("just text\n")
    with pytest.raises(KeyFileError, match="no public-key"):
        load_key_file(bad)
    other_public = load_key_file(keys["server_pub"]).public.decode()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(keys["client_sec"].read_text().replace(load_key_file(keys["client_sec"]).public.decode(),
                                                            other_public))
    with pytest.raises(KeyFileError, match="does not belong"):
        load_key_file(mixed)
    with pytest.raises(KeyFileError, match="not found"):
        load_key_file(tmp_path / "missing.key")
    assert set(load_allowed_keys(keys["allowed_dir"])) == {load_key_file(keys["client_sec"]).public}


# ---- config --------------------------------------------------------------------------------------

CURVE_CONFIG = """\
model:
  path: m.onnx
publisher:
  endpoint: tcp://0.0.0.0:5555
  name: edge-01
  curve:
    server_secret_key: {secret}
    allowed_clients_dir: {allowed}
"""


def write_config(tmp_path: Path, secret: str, allowed: str) -> Path:
    (tmp_path / "m.onnx").write_bytes(b"not inspected by the config loader")
    p = tmp_path / "streamd.yaml"
    p.write_text(CURVE_CONFIG.format(secret=secret, allowed=allowed))
    return p


def test_config_resolves_key_paths_against_the_config_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    cfg = load_config(write_config(tmp_path, "server/daemon.key_secret", "allowed"))
    assert cfg.publisher.curve is not None
    assert cfg.publisher.curve.server_secret_key == keys["server_sec"]
    assert cfg.publisher.curve.allowed_clients_dir == keys["allowed_dir"]
    assert cfg.publisher.name == "edge-01"


@pytest.mark.parametrize("secret, allowed, field, line, words", [
    ("server/missing.key_secret", "allowed", "publisher.curve.server_secret_key", 7, "key file not found"),
    ("server/daemon.key", "allowed", "publisher.curve.server_secret_key", 7, "no secret key"),
    ("server/daemon.key_secret", "nowhere", "publisher.curve.allowed_clients_dir", 8, "folder not found"),
    ("server/daemon.key_secret", "server/daemon.key", "publisher.curve.allowed_clients_dir", 8, "not a folder"),
    ("server/daemon.key_secret", "empty", "publisher.curve.allowed_clients_dir", 8, "no client public keys"),
])
def test_config_errors_for_key_files_name_field_and_line(tmp_path: Path, keys: dict[str, Path], secret: str,
                                                         allowed: str, field: str, line: int, words: str) -> None:
    (tmp_path / "empty").mkdir()
    path = write_config(tmp_path, secret, allowed)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.field, err.line) == (field, line), str(err)
    assert words in str(err) and f"streamd.yaml:{line}" in str(err)


def test_config_curve_keys_are_required_and_name_is_checked(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = write_config(tmp_path, "server/daemon.key_secret", "allowed")
    text = path.read_text()
    path.write_text(text.replace("    allowed_clients_dir: allowed\n", ""))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "publisher.curve.allowed_clients_dir" in str(info.value) and "is required" in str(info.value)
    path.write_text(text.replace("name: edge-01", "name: edge/01"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "publisher.name" and info.value.line == 5
    # Without file checks (e.g. validating on another machine) the keys need not exist yet.
    path.write_text(CURVE_CONFIG.format(secret="later.key_secret", allowed="later"))
    cfg = load_config(path, check_files=False)
    assert cfg.publisher.curve is not None and cfg.publisher.curve.server_secret_key == tmp_path / "later.key_secret"


def test_generated_keys_are_fresh_each_time(tmp_path: Path) -> None:
    seen = {generate_key_files(tmp_path, f"k{i}")[2] for i in range(5)}
    assert len(seen) == 5
