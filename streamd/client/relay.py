"""``streamd relay``: many daemons in, one PUB endpoint out.

An XSUB socket connects to every upstream daemon's PUB socket and an XPUB socket is bound
for subscribers; ZeroMQ's own proxy forwards messages down and subscriptions up, so a
subscriber filtered to ``cam/door/`` makes every daemon send only that, and the relay never
decodes, re-encodes or reorders anything. Bodies already say where they come from
(``origin``, ``host``, ``pub``), so one stream from many boxes stays unambiguous.

Either side may use CURVE: upstream, the relay is a client of each daemon with its own key
pair; downstream, it is a CURVE server with its own allowed-clients folder.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import zmq

from ..errors import StreamdError
from ..security import (CurveKeys, KeyFileError, ServerSecurity, apply_client, apply_server, endpoint_is_loopback,
                       load_allowed_keys, load_key_file, load_secret_key_file)

log = logging.getLogger("streamd.relay")

DEFAULT_HWM = 100000


class RelayError(StreamdError):
    """The relay could not bind, connect, or load its keys."""


@dataclass(frozen=True)
class Upstream:
    endpoint: str
    server_key: Path | None = None     # the daemon's public key file: connect with CURVE


class Relay:
    """The two sockets and the proxy thread between them.

    Sockets are made, bound and connected in the constructor (the caller's thread) so a bad
    endpoint or key fails at once; the proxy thread owns them from ``start()`` on."""

    def __init__(self, listen: str, upstreams: Sequence[Upstream], *, allow_non_loopback: bool = False,
                 server_secret_key: Path | None = None, allowed_clients_dir: Path | None = None,
                 client_key: Path | None = None, hwm: int = DEFAULT_HWM) -> None:
        if not upstreams:
            raise RelayError("no upstream: give at least one --from")
        if (server_secret_key is None) != (allowed_clients_dir is None):
            raise RelayError("CURVE for subscribers needs both --server-secret-key and --allowed-clients-dir")
        curve_down = server_secret_key is not None
        if not endpoint_is_loopback(listen):
            if curve_down:
                log.info("listening on %s with CURVE: encrypted, only listed client keys may subscribe", listen)
            elif not allow_non_loopback:
                raise RelayError(f"--listen {listen} is not a loopback address; give --server-secret-key and "
                                 f"--allowed-clients-dir to encrypt it, or --allow-non-loopback to relay "
                                 f"unencrypted to the network")
            else:
                log.warning("relaying on %s: reachable from the network, messages are not encrypted", listen)
        curve_up = [u for u in upstreams if u.server_key is not None]
        if curve_up and client_key is None:
            raise RelayError("--from-curve needs --client-key (the relay's own .key_secret file)")
        try:
            own_keys: CurveKeys | None = load_secret_key_file(client_key) if curve_up and client_key else None
            up_keys = {u.endpoint: load_key_file(u.server_key).public for u in curve_up if u.server_key}
            down = (load_secret_key_file(server_secret_key), load_allowed_keys(allowed_clients_dir)) \
                if server_secret_key is not None and allowed_clients_dir is not None else None
        except KeyFileError as exc:
            raise RelayError(str(exc)) from None

        # A private context: the ZAP handler of the subscriber side is per context, and
        # terminating it is the last step of a clean stop.
        self._ctx = zmq.Context()
        self._security: ServerSecurity | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.error: BaseException | None = None
        self.upstreams = list(upstreams)
        control_addr = f"inproc://streamd-relay-control-{id(self)}"
        self._xsub = self._ctx.socket(zmq.XSUB)
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._control = self._ctx.socket(zmq.PAIR)     # the proxy thread's end
        self._command = self._ctx.socket(zmq.PAIR)     # stop()'s end
        try:
            for s in (self._xsub, self._xpub, self._control, self._command):
                s.setsockopt(zmq.LINGER, 0)
            self._xsub.setsockopt(zmq.RCVHWM, hwm)
            self._xpub.setsockopt(zmq.SNDHWM, hwm)
            self._control.bind(control_addr)
            self._command.connect(control_addr)
            if down is not None:
                self._security = apply_server(self._xpub, down[0], down[1])
            self._xpub.bind(listen)
            self.bound_endpoint = self._xpub.getsockopt(zmq.LAST_ENDPOINT).decode()
            # libzmq fixes a connection's security when connect() is called and CURVE options
            # can't be unset: plain upstreams first, then each CURVE one with its server's key.
            for u in sorted(upstreams, key=lambda u: u.server_key is not None):
                if u.server_key is not None and own_keys is not None:
                    apply_client(self._xsub, up_keys[u.endpoint], own_keys)
                try:
                    self._xsub.connect(u.endpoint)
                except zmq.ZMQError as exc:
                    raise RelayError(f"cannot connect to upstream {u.endpoint}: {exc}") from None
        except zmq.ZMQError as exc:
            self._close_all()
            raise RelayError(f"cannot listen on {listen}: {exc}") from None
        except BaseException:
            self._close_all()
            raise

    def start(self) -> None:
        with self._lock:
            if self._stopped or self._thread is not None:
                raise RuntimeError("a relay starts once")
            self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
            self._thread.start()
        log.info("relaying %d upstream(s) to %s: %s", len(self.upstreams), self.bound_endpoint,
                 ", ".join(u.endpoint + (" (curve)" if u.server_key else "") for u in self.upstreams))

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def threads(self) -> list[threading.Thread]:
        """Every thread this relay runs (for checks that none outlives ``stop()``)."""
        out = [self._thread] if self._thread is not None else []
        if self._security is not None and self._security.thread is not None:
            out.append(self._security.thread)
        return out

    def _run(self) -> None:
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._control)
        except BaseException as exc:  # noqa: BLE001 - reported by stop() and the CLI
            self.error = exc
            log.error("relay stopped by an error: %s", exc)
        finally:
            for s in (self._xsub, self._xpub, self._control):
                s.close(0)

    def stop(self, timeout: float = 5.0) -> None:
        """End the proxy, its sockets, the ZAP thread and the context; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        if thread is not None:
            if thread.is_alive():
                self._command.send(b"TERMINATE")
            thread.join(timeout)
            if thread.is_alive():
                raise RelayError(f"the relay thread did not stop within {timeout:.0f}s")
        self._close_all()

    def _close_all(self) -> None:
        for s in (self._xsub, self._xpub, self._control, self._command):
            s.close(0)
        if self._security is not None:
            self._security.stop()
            self._security = None
        self._ctx.term()

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
