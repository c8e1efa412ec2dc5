"""streamd.service.systemd against a real AF_UNIX datagram socket, and the unit file against systemd.

The listener below plays systemd's part: it binds the socket, the Notifier under test finds
it through $NOTIFY_SOCKET, and the assertions read exactly what arrived. Every wait is a
socket timeout bounded by a deadline, never a sleep.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamd.service.systemd import Notifier, Watchdog

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "streamd.service"
UNIT_README = REPO / "systemd" / "README.md"

Message = dict[str, str]


class NotifyListener:
    """The receiving end of $NOTIFY_SOCKET, as systemd would hold it."""

    def __init__(self, abstract: bool = False) -> None:
        self._dir: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"streamd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # Not pytest's tmp_path: AF_UNIX paths are limited to 107 bytes.
            self._dir = tempfile.mkdtemp(prefix="sdn-")
            path = os.path.join(self._dir, "notify")
            self.sock.bind(path)
            self.env_value = path

    def recv(self, timeout: float) -> tuple[Message, str, float] | None:
        """One datagram parsed into assignments, its raw text and its arrival time."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return None
        raw = data.decode()
        msg: Message = {}
        for line in raw.splitlines():
            key, _, value = line.partition("=")
            msg[key] = value
        return msg, raw, time.monotonic()

    def expect(self, timeout: float = 5.0) -> Message:
        got = self.recv(timeout)
        assert got is not None, f"no notification within {timeout:.0f}s"
        return got[0]

    def collect_until(self, done: Callable[[list[tuple[Message, float]]], bool],
                      timeout: float, what: str) -> list[tuple[Message, float]]:
        """Receive until ``done(messages)`` holds; fail after ``timeout`` seconds."""
        seen: list[tuple[Message, float]] = []
        deadline = time.monotonic() + timeout
        while not done(seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; got {seen}")
            got = self.recv(left)
            if got is not None:
                seen.append((got[0], got[2]))
        return seen

    def collect_for(self, seconds: float) -> list[Message]:
        """Everything that arrives within ``seconds``: for asserting that something does not."""
        seen: list[Message] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is not None:
                seen.append(got[0])
        return seen

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # The test run itself may be a systemd service: never let its variables leak in.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def listener(clean_env: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    lst = NotifyListener()
    clean_env.setenv("NOTIFY_SOCKET", lst.env_value)
    yield lst
    lst.close()


def _watchdog_env(monkeypatch: pytest.MonkeyPatch, usec: int, pid: int | None = None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid is None else pid))


def _pings(messages: list[tuple[Message, float]]) -> list[float]:
    return [t for m, t in messages if m.get("WATCHDOG") == "1"]


# ---- Notifier --------------------------------------------------------------------------------

def test_ready_carries_status(listener: NotifyListener) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready("model yolov8s loaded, publishing on tcp://127.0.0.1:5555") is True
    assert listener.expect() == {"READY": "1", "STATUS": "model yolov8s loaded, publishing on tcp://127.0.0.1:5555"}


def test_every_message_kind_arrives_in_order(listener: NotifyListener) -> None:
    n = Notifier()
    assert n.status("3 of 4 cameras streaming")
    assert n.reloading()
    assert n.ready_after_reload("config reloaded")
    assert n.extend_timeout(90, "building TensorRT engine")
    assert n.stopping("stopping")
    got = [listener.expect() for _ in range(5)]
    assert got[0] == {"STATUS": "3 of 4 cameras streaming"}
    assert got[1]["RELOADING"] == "1"
    assert got[2] == {"READY": "1", "STATUS": "config reloaded"}
    assert got[3] == {"EXTEND_TIMEOUT_USEC": "90000000", "STATUS": "building TensorRT engine"}
    assert got[4] == {"STOPPING": "1", "STATUS": "stopping"}


def test_reloading_stamps_clock_monotonic(listener: NotifyListener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = listener.expect()
    assert set(msg) == {"RELOADING", "MONOTONIC_USEC"}
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_a_status_text_cannot_inject_assignments(listener: NotifyListener) -> None:
    Notifier().status("camera door: 401\nREADY=1\nWATCHDOG=1")
    got = listener.recv(5.0)
    assert got is not None
    msg, raw, _ = got
    assert raw == "STATUS=camera door: 401 READY=1 WATCHDOG=1\n"
    assert set(msg) == {"STATUS"}


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    lst = NotifyListener(abstract=True)
    try:
        assert lst.env_value.startswith("@")
        clean_env.setenv("NOTIFY_SOCKET", lst.env_value)
        assert Notifier().ready("up") is True
        assert lst.expect() == {"READY": "1", "STATUS": "up"}
    finally:
        lst.close()


def test_without_notify_socket_every_call_is_a_safe_noop(clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 100_000)
    n = Notifier()
    assert not n.enabled
    assert [n.ready("x"), n.reloading(), n.ready_after_reload(), n.stopping(), n.status("x"),
            n.watchdog(), n.extend_timeout(5)] == [False] * 7
    w = Watchdog(n, lambda: (True, ""))
    w.start()
    w.join(5.0)
    assert not w.is_alive(), "the watchdog thread must exit at once when there is no socket"
    assert w.pings == 0


def test_unusable_socket_address_disables_notifications(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:9999")
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False


def test_send_failure_is_logged_once_and_never_raised(clean_env: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    gone = tempfile.mkdtemp(prefix="sdn-")
    try:
        clean_env.setenv("NOTIFY_SOCKET", os.path.join(gone, "no-such-socket"))
        n = Notifier()
        with caplog.at_level(logging.DEBUG, logger="streamd.service"):
            assert n.ready() is False
            assert n.status("still nobody") is False
            assert n.stopping() is False
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "READY=1" in warnings[0].getMessage()
    finally:
        shutil.rmtree(gone, ignore_errors=True)


def test_a_full_socket_drops_messages_instead_of_blocking(listener: NotifyListener) -> None:
    # Nobody reads the listener: its queue fills, and every further send must fail fast.
    n = Notifier()
    t0 = time.monotonic()
    results = [n.status("x" * 1000) for _ in range(5000)]
    elapsed = time.monotonic() - t0
    assert not all(results), "the receive queue never filled up; the test proves nothing"
    assert elapsed < 10.0, f"sending blocked: 5000 sends took {elapsed:.1f}s"


def test_watchdog_interval_is_half_of_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    assert Notifier().watchdog_interval_s is None
    _watchdog_env(clean_env, 30_000_000)
    assert Notifier().watchdog_interval_s == pytest.approx(15.0)
    clean_env.delenv("WATCHDOG_PID")    # systemd may leave it out; then the watchdog is ours
    assert Notifier().watchdog_interval_s == pytest.approx(15.0)
    clean_env.setenv("WATCHDOG_USEC", "0")
    assert Notifier().watchdog_interval_s is None
    clean_env.setenv("WATCHDOG_USEC", "soon")
    assert Notifier().watchdog_interval_s is None


def test_watchdog_meant_for_another_pid_sends_no_pings(listener: NotifyListener,
                                                         clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 100_000, pid=os.getpid() + 1)
    n = Notifier()
    assert n.watchdog_interval_s is None
    assert n.watchdog() is False
    w = Watchdog(n, lambda: (True, ""))
    w.start()
    w.join(5.0)
    assert not w.is_alive()
    # The socket itself still works, and the first thing on it is this, not a ping.
    assert n.ready()
    assert listener.expect() == {"READY": "1"}


# ---- Watchdog thread ---------------------------------------------------------------------------

def test_watchdog_pings_at_about_the_interval_while_healthy(listener: NotifyListener,
                                                            clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 200_000)                       # pings every 0.1 s
    w = Watchdog(Notifier(), lambda: (True, "ok"))
    assert w.name == "sd-watchdog" and w.daemon
    t0 = time.monotonic()
    w.start()
    try:
        got = listener.collect_until(lambda seen: len(_pings(seen)) >= 8, 15.0, "8 watchdog pings")
    finally:
        assert w.stop(5.0)
    elapsed = _pings(got)[7] - t0
    # The 8th ping is due 7 intervals after the first, which goes out at once. Arrival times
    # bound it from above (a busy machine only delays), and the schedule from below: pings
    # never come faster than the interval, however late this test reads them.
    assert 0.65 <= elapsed <= 7.0, f"8 pings took {elapsed:.2f}s, expected about 0.7s"
    assert all(m == {"WATCHDOG": "1"} for m, _ in got), "healthy pings carry nothing else"


def test_watchdog_stops_while_unhealthy_and_resumes(listener: NotifyListener,
                                                    clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 200_000)                       # pings every 0.1 s
    hung = threading.Event()                                # "inference is stuck in a CUDA call"

    def healthy() -> tuple[bool, str]:
        if hung.is_set():
            return False, "no inference progress for 45 s"
        return True, "4 cameras, inference running"

    w = Watchdog(Notifier(), healthy)
    w.start()
    try:
        listener.collect_until(lambda seen: len(_pings(seen)) >= 2, 10.0, "pings while healthy")

        hung.set()
        # A ping already past its health check may still arrive; the status follows it, from
        # the same thread, so once the status is here no ping may come after it.
        got = listener.collect_until(lambda seen: any("STATUS" in m for m, _ in seen), 10.0,
                                     "the unhealthy status")
        status = [m for m, _ in got if "STATUS" in m]
        assert status == [{"STATUS": "unhealthy: no inference progress for 45 s"}]
        assert w.unhealthy_since is not None
        quiet = listener.collect_for(1.0)                   # ten intervals
        assert quiet == [], f"sent while unhealthy: {quiet}"

        hung.clear()
        got = listener.collect_until(
            lambda seen: len(_pings(seen)) >= 2 and any("STATUS" in m for m, _ in seen), 10.0,
            "pings and a status after recovery")
        assert [m for m, _ in got if "STATUS" in m] == [{"STATUS": "4 cameras, inference running"}]
        assert w.unhealthy_since is None
    finally:
        assert w.stop(5.0), "stop() must join the thread"
    assert not w.is_alive()


def test_a_degraded_but_healthy_answer_updates_the_status_and_keeps_pinging(
        listener: NotifyListener, clean_env: pytest.MonkeyPatch) -> None:
    # A camera whose decoder thread is being restarted: said in the status line, but the
    # service is still serving the other cameras, so the pings must not stop.
    _watchdog_env(clean_env, 200_000)                       # pings every 0.1 s
    degraded = threading.Event()

    def healthy() -> tuple[bool, str]:
        return True, "camera gate: decoder thread died (RuntimeError)" if degraded.is_set() else "3 cameras"

    w = Watchdog(Notifier(), healthy)
    w.start()
    try:
        got = listener.collect_until(lambda seen: len(_pings(seen)) >= 2, 10.0, "pings while healthy")
        assert all(m == {"WATCHDOG": "1"} for m, _ in got), "an unchanged reason is not re-sent"
        degraded.set()
        got = listener.collect_until(
            lambda seen: any("STATUS" in m for m, _ in seen) and len(_pings(seen)) >= 3, 10.0,
            "the degraded status, pings going on")
        assert [m for m, _ in got if "STATUS" in m] == [{"STATUS": "camera gate: decoder thread died (RuntimeError)"}]
        assert w.unhealthy_since is None
        degraded.clear()
        got = listener.collect_until(lambda seen: any("STATUS" in m for m, _ in seen), 10.0, "the status back")
        assert [m for m, _ in got if "STATUS" in m] == [{"STATUS": "3 cameras"}]
    finally:
        assert w.stop(5.0)


def test_recovery_pings_at_once_instead_of_a_full_interval_later(listener: NotifyListener,
                                                                  clean_env: pytest.MonkeyPatch) -> None:
    # 30 s between pings: a recovery ping that waited for the schedule would arrive at the very
    # end of systemd's patience. It has to come within about a second of the recovery.
    _watchdog_env(clean_env, 60_000_000)
    swapping = threading.Event()
    swapping.set()                                          # e.g. a pipeline swap in a reload

    def healthy() -> tuple[bool, str]:
        return (False, "pipeline being swapped") if swapping.is_set() else (True, "serving")

    w = Watchdog(Notifier(), healthy)
    w.start()
    try:
        assert listener.expect(10.0) == {"STATUS": "unhealthy: pipeline being swapped"}
        swapping.clear()
        got = listener.collect_until(lambda seen: len(_pings(seen)) >= 1, 10.0, "the recovery ping")
        assert got[0][0] == {"WATCHDOG": "1"}
        assert listener.expect(5.0) == {"STATUS": "serving"}
    finally:
        assert w.stop(5.0)


def test_a_health_check_that_raises_counts_as_unhealthy(listener: NotifyListener,
                                                        clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 200_000)

    def broken() -> tuple[bool, str]:
        raise RuntimeError("stats lock poisoned")

    w = Watchdog(Notifier(), broken)
    w.start()
    try:
        first = listener.expect(10.0)
        assert first == {"STATUS": "unhealthy: health check failed: RuntimeError: stats lock poisoned"}
        assert listener.collect_for(0.5) == []
        assert w.is_alive(), "a failing health check must not kill the thread"
    finally:
        assert w.stop(5.0)


def test_stop_wakes_a_long_interval_at_once(listener: NotifyListener,
                                           clean_env: pytest.MonkeyPatch) -> None:
    _watchdog_env(clean_env, 600_000_000)                   # a ping every 300 s
    w = Watchdog(Notifier(), lambda: (True, ""))
    w.start()
    assert listener.expect(10.0) == {"WATCHDOG": "1"}       # the first ping is immediate
    t0 = time.monotonic()
    assert w.stop(5.0)
    assert time.monotonic() - t0 < 5.0
    assert Watchdog(Notifier(), lambda: (True, "")).stop() is True   # never started: fine


# ---- the unit file -----------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                           reason="systemd-analyze is not installed (package systemd)")
# Where the installed systemd keeps its own units (sysinit.target and friends): verify needs
# them inside the alternate root to resolve the unit's default dependencies.
_SYSTEM_UNIT_DIRS = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]
# What the install notes put in place; verify checks that the commands exist and are executable.
_EXECUTABLES = ["opt/streamd/venv/bin/streamd", "bin/kill"]
_INSTALLED_UNIT = "etc/systemd/system/streamd.service"


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_matches_what_the_daemon_speaks() -> None:
    s = _unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]            # the Watchdog thread sends with the main PID
    assert s["WatchdogSec"] == ["30"]
    assert s["ExecStart"] == ["/opt/streamd/venv/bin/streamd run -c /etc/streamd/streamd.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["PrivateDevices"] == ["no"]            # yes would hide every GPU node
    assert s["DevicePolicy"] == ["closed"]
    assert "char-nvidia* rw" in s["DeviceAllow"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    units = next((d for d in _SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("systemd's own unit files (sysinit.target) are not installed")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    for rel in _EXECUTABLES:
        exe = root / rel
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root


def _install(root: Path, unit_text: str, dropins: dict[str, str] | None = None) -> Path:
    path = root / _INSTALLED_UNIT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text)
    dropin_dir = path.parent / "streamd.service.d"
    shutil.rmtree(dropin_dir, ignore_errors=True)
    for name, text in (dropins or {}).items():
        dropin_dir.mkdir(exist_ok=True)
        (dropin_dir / name).write_text(text)
    return path


def _verify(root: Path, unit_text: str, dropins: dict[str, str] | None = None) -> list[str]:
    """Problems systemd-analyze finds. It exits 0 for most of them (an unknown key, a bad
    value: systemd ignores the line and goes on), so any output at all is a problem."""
    path = _install(root, unit_text, dropins)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", f"--root={root}", str(path)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not problems:
        problems = [f"systemd-analyze verify exited {proc.returncode}"]
    return problems


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(fake_root: Path) -> None:
    assert _verify(fake_root, UNIT.read_text()) == []


@needs_systemd_analyze
@pytest.mark.parametrize("good, bad", [
    ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),                  # unknown key
    ("ProtectSystem=strict", "ProtectSystem=strcit"),               # bad value
    ("WatchdogSec=30", "WatchdogSec=3O"),                           # letter O: bad time span
    ("DeviceAllow=char-video4linux rw", "DeviceAllow=char-video4linux rx"),
    ("SystemCallFilter=@system-service", "SystemCallFilter=@system-servce"),
    ("ExecStart=/opt/streamd/venv/bin/streamd", "ExecStart=/opt/streamd/bin/streamd"),
    ("[Service]", "[Servce]"),
])
def test_verify_catches_a_typo(fake_root: Path, good: str, bad: str) -> None:
    text = UNIT.read_text()
    line = re.compile(rf"^{re.escape(good)}", flags=re.M)
    assert line.search(text), f"no line starts with {good!r}"
    assert _verify(fake_root, line.sub(bad, text, count=1)) != []


def _readme_dropins() -> dict[str, str]:
    """The ```ini drop-ins in systemd/README.md, keyed by file name from their first line."""
    out: dict[str, str] = {}
    for _indent, body in re.findall(r"^( *)```ini\n(.*?)^\1```", UNIT_README.read_text(), flags=re.S | re.M):
        block = textwrap.dedent(body)
        m = re.match(r"# /etc/systemd/system/streamd\.service\.d/([\w.-]+\.conf)\n", block)
        assert m, f"a drop-in in systemd/README.md does not start with its path: {block[:60]!r}"
        out[m.group(1)] = block
    return out


@needs_systemd_analyze
def test_readme_dropins_pass_verify(fake_root: Path) -> None:
    dropins = _readme_dropins()
    assert {"jetson.conf", "mdwe.conf"} <= set(dropins)
    assert _verify(fake_root, UNIT.read_text(), dropins) == []
    # The same check does see a broken drop-in.
    assert _verify(fake_root, UNIT.read_text(), {"bad.conf": "[Service]\nDeviceAllow=/dev/nvmap rwx\n"}) != []


def _supports_offline_security() -> bool:
    if SYSTEMD_ANALYZE is None:
        return False
    out = subprocess.run([SYSTEMD_ANALYZE, "--help"], capture_output=True, text=True, timeout=30).stdout
    return "--offline" in out


@pytest.mark.skipif(not _supports_offline_security(),
                    reason="systemd-analyze security --offline needs systemd >= 250")
def test_security_exposure_stays_low(fake_root: Path) -> None:
    path = _install(fake_root, UNIT.read_text())
    proc = subprocess.run([SYSTEMD_ANALYZE or "systemd-analyze", "security", "--offline=true", "--no-pager",
                           f"--root={fake_root}", str(path)], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for streamd\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    # 1.6 when written; a loosened sandbox shows up here before it ships.
    assert float(m.group(1)) <= 2.0, proc.stdout
