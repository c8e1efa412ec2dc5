"""The fan-in relay with real sockets: several publishers in, one endpoint out, origins kept,
subscriptions carried upstream, CURVE on either side, and a stop that leaves nothing behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from streamd import protocol
from streamd.client.relay import Relay, RelayError, Upstream
from streamd.config import CurveConfig, PublisherConfig
from streamd.outputs.zmq_publisher import Publisher
from streamd.security import generate_key_files, load_key_file, load_secret_key_file
from tests.fixtures_daemon import REPO, Collector, DaemonProcess, free_tcp_port, wait_until
from tests.test_daemon import base_config
from tests.test_publisher import make_message
from tests.test_security import ProbeSubscriber


def loopback_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def publisher(name: str | None = None, **kw: Any) -> Publisher:
    pub = Publisher(PublisherConfig(endpoint=loopback_endpoint(), heartbeat_s=0.2, name=name, **kw))
    pub.start()
    return pub


def stop_all(pubs: list[Publisher]) -> None:
    for p in pubs:
        p.stop()
    for p in pubs:
        p.join(5)
        assert not p.is_alive()


def feed_until(pubs: dict[str, Publisher], done: Any, timeout: float, what: str) -> None:
    """Publish one detection per publisher per poll until ``done()``: subscriptions travel
    through the relay to each publisher a little later (slow joiner), so keep sending."""
    n = 0

    def step() -> bool:
        nonlocal n
        n += 1
        for cam, p in pubs.items():
            p.offer(make_message(cam, n))
        return bool(done())
    wait_until(step, timeout, interval=0.05, what=what)


@pytest.fixture
def no_new_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_until(lambda: set(threading.enumerate()) <= before, 5,
               what=f"no thread left behind: {set(threading.enumerate()) - before}")


def test_messages_say_which_box_sent_them() -> None:
    named, unnamed = publisher("box-a"), publisher()
    ca, cb = Collector(named.bound_endpoint), Collector(unnamed.bound_endpoint)
    try:
        feed_until({"door": named, "gate": unnamed}, lambda: ca.of("detections") and cb.of("detections"), 10,
                   "detections from both publishers")
        for m in ca.of():
            assert m["origin"] == "box-a" and m["host"] == socket.gethostname()
        for m in cb.of():
            assert m["origin"] == socket.gethostname() == m["host"]
    finally:
        ca.close()
        cb.close()
        stop_all([named, unnamed])


def test_relay_merges_publishers_keeps_origins_and_filters_upstream(no_new_threads: None) -> None:
    a, b = publisher("box-a"), publisher("box-b")
    relay = Relay(loopback_endpoint(), [Upstream(a.bound_endpoint), Upstream(b.bound_endpoint)])
    relay.start()
    everything = Collector(relay.bound_endpoint)
    only_gate = Collector(relay.bound_endpoint, [protocol.camera_prefix("gate")])
    try:
        feed_until({"door": a, "gate": b},
                   lambda: {m["origin"] for m in everything.of("detections")} == {"box-a", "box-b"}
                   and only_gate.of("detections"), 20, "detections of both boxes through the relay")
        by_origin = {(m["origin"], m["camera"]) for m in everything.of("detections")}
        assert by_origin == {("box-a", "door"), ("box-b", "gate")}
        # Bodies are forwarded untouched: each box's own seq still runs without gaps.
        for pub_id in {m["pub"] for m in everything.of()}:
            seqs = [m["seq"] for m in everything.of() if m["pub"] == pub_id]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # PUB filters at the sender, so anything arriving proves subscriptions went upstream;
        # and a prefix subscriber of the relay gets only its prefix.
        assert {m["camera"] for m in only_gate.of("detections")} == {"gate"}
        threads = relay.threads
        relay.stop(timeout=5)      # raises if its thread is still running by then
        assert not any(t.is_alive() for t in threads)
        relay.stop()   # twice is fine
    finally:
        relay.stop()
        everything.close()
        only_gate.close()
        stop_all([a, b])


def test_relay_with_curve_on_both_sides(tmp_path: Path, no_new_threads: None) -> None:
    daemon_pub, daemon_sec, _ = generate_key_files(tmp_path / "daemon", "daemon")
    relay_pub, relay_sec, _ = generate_key_files(tmp_path / "relay", "relay")
    viewer_pub, viewer_sec, _ = generate_key_files(tmp_path / "viewer", "viewer")
    daemon_allows, relay_allows = tmp_path / "daemon-allows", tmp_path / "relay-allows"
    daemon_allows.mkdir()
    relay_allows.mkdir()
    (daemon_allows / relay_pub.name).write_bytes(relay_pub.read_bytes())
    (relay_allows / viewer_pub.name).write_bytes(viewer_pub.read_bytes())

    secure = publisher("box-a", curve=CurveConfig(server_secret_key=daemon_sec, allowed_clients_dir=daemon_allows))
    plain = publisher("box-b")
    relay = Relay(loopback_endpoint(), [Upstream(secure.bound_endpoint, daemon_pub), Upstream(plain.bound_endpoint)],
                  client_key=relay_sec, server_secret_key=relay_sec, allowed_clients_dir=relay_allows)
    relay.start()
    viewer = ProbeSubscriber(relay.bound_endpoint, load_key_file(relay_pub).public, load_secret_key_file(viewer_sec))
    outsider = ProbeSubscriber(relay.bound_endpoint)
    try:
        feed_until({"door": secure, "gate": plain},
                   lambda: {m["origin"] for m in viewer.of("detections")} == {"box-a", "box-b"}, 20,
                   "detections of the CURVE box and the plain box at the CURVE viewer")
        wait_until(lambda: outsider.handshakes_failed, 10, what="the keyless subscriber to be refused")
        assert outsider.messages == []
        threads = relay.threads
        assert len(threads) == 2      # the proxy and the subscriber side's ZAP handler
        relay.stop()
        assert not any(t.is_alive() for t in threads)
    finally:
        relay.stop()
        viewer.close()
        outsider.close()
        stop_all([secure, plain])


def test_relay_refuses_bad_setups(tmp_path: Path) -> None:
    up = [Upstream(loopback_endpoint())]
    with pytest.raises(RelayError, match="not a loopback address.*--allow-non-loopback"):
        Relay(f"tcp://0.0.0.0:{free_tcp_port()}", up)
    with pytest.raises(RelayError, match="--client-key"):
        Relay(loopback_endpoint(), [Upstream(loopback_endpoint(), tmp_path / "d.key")])
    with pytest.raises(RelayError, match="both"):
        Relay(loopback_endpoint(), up, server_secret_key=tmp_path / "x.key_secret")
    with pytest.raises(RelayError, match="key file not found"):
        Relay(loopback_endpoint(), up, server_secret_key=tmp_path / "x.key_secret", allowed_clients_dir=tmp_path)
    with pytest.raises(RelayError, match="no upstream"):
        Relay(loopback_endpoint(), [])
    taken = loopback_endpoint()
    first = Relay(taken, up)
    try:
        with pytest.raises(RelayError, match="cannot listen"):
            Relay(taken, up)
    finally:
        first.stop()
    # Opted in, it binds every interface (nothing here connects to it).
    open_relay = Relay(f"tcp://0.0.0.0:{free_tcp_port()}", up, allow_non_loopback=True)
    open_relay.stop()


@pytest.mark.slow
def test_relay_process_merges_two_real_daemons(yolov8n_onnx_320: Path, test_media: Any, tmp_path: Path) -> None:
    """Two daemon processes (one with CURVE), the relay as a process, one subscriber that
    only knows the relay and still tells both boxes apart."""
    keys = tmp_path / "keys"
    daemon_pub, _, _ = generate_key_files(keys, "box-a")
    relay_pub, relay_sec, _ = generate_key_files(keys, "relay")
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    (work_a / "allowed").mkdir(parents=True)
    work_b.mkdir()
    (work_a / "allowed" / relay_pub.name).write_bytes(relay_pub.read_bytes())
    (work_a / "box-a.key_secret").write_bytes((keys / "box-a.key_secret").read_bytes())
    (work_a / "box-a.key_secret").chmod(0o600)

    clip = str(test_media["bus"].mp4)
    cfg_a = base_config(yolov8n_onnx_320, [{"id": "door", "url": clip, "loop": True, "fps": 2}])
    cfg_a["publisher"].update(name="box-a", curve={"server_secret_key": "box-a.key_secret",   # relative paths:
                                                   "allowed_clients_dir": "allowed"})         # next to the config
    cfg_b = base_config(yolov8n_onnx_320, [{"id": "door", "url": clip, "loop": True, "fps": 2}])
    cfg_b["publisher"]["name"] = "box-b"
    for cfg in (cfg_a, cfg_b):
        cfg["metrics"] = {"enabled": False}
    listen = loopback_endpoint()
    daemons: list[DaemonProcess] = []
    relay_log = tmp_path / "relay.log"
    relay: subprocess.Popen[bytes] | None = None
    collector: Collector | None = None
    try:
        daemons.append(DaemonProcess(cfg_a, work_a))
        daemons.append(DaemonProcess(cfg_b, work_b))
        with open(relay_log, "wb") as log:
            relay = subprocess.Popen(
                [sys.executable, "-m", "streamd.cli.relay", "--listen", listen,
                 "--from", cfg_b["publisher"]["endpoint"],
                 "--from-curve", cfg_a["publisher"]["endpoint"], str(daemon_pub), "--client-key", str(relay_sec)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        collector = Collector(listen)

        def logs() -> str:
            return "\n".join(f"--- {d.config_path.parent.name}:\n{d.log()[-1500:]}" for d in daemons) + \
                f"\n--- relay:\n{relay_log.read_text(errors='replace')[-1500:]}"
        # Same camera id on both boxes: only origin (and pub) tell them apart.
        for box in ("box-a", "box-b"):
            collector.wait_for(lambda m, box=box: m["type"] == "detections" and m["origin"] == box, 120,
                               f"detections from {box} through the relay\n{logs()}")
        dets = collector.of("detections")
        assert {m["camera"] for m in dets} == {"door"}
        assert len({m["pub"] for m in dets if m["origin"] == "box-a"}) == 1
        assert all(m["host"] == socket.gethostname() for m in dets)

        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0, logs()          # the deadline: wait raises after 10 s
        assert "relay stopped cleanly" in relay_log.read_text()
        for d in daemons:
            assert d.stop() == 0, d.log()[-3000:]
            # The publisher thread ends only after its ZAP thread, so this covers CURVE too.
            assert "stopped cleanly" in d.log()
    finally:
        if collector is not None:
            collector.close()
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.wait(5)
        for d in daemons:
            d.kill()
