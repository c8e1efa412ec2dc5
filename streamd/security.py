"""CurveZMQ for the PUB socket: key files, the allowed-clients list, and socket set-up.

Key files use ZeroMQ's certificate format (the one ``zmq.auth`` and czmq read and write):
``NAME.key`` holds only the public key and may be handed out; ``NAME.key_secret`` holds
both keys and is created mode 0600. A server (the daemon, or a relay's subscriber side)
encrypts everything and, through a ZAP handler, lets in only clients whose public key file
sits in its allowed-clients folder. A client must know the server's public key, so it also
knows it reached the right server.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import StreamdError

log = logging.getLogger("streamd.security")

def endpoint_is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint stays on this machine. Only a loopback address or
    ``localhost`` counts: a wildcard (``*``, ``0.0.0.0``, ``[::]``), an interface name or any
    other host name may reach the network (and ``127.0.0.1.example.com`` is no loopback)."""
    if not endpoint.startswith("tcp://"):
        return True   # ipc:// and inproc:// never leave the machine
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def publisher_exposure_problem(endpoint: str, encrypted: bool, allow_non_loopback: bool) -> str | None:
    """Why the daemon refuses to publish on ``endpoint``, or None: plain text to the network
    only when the config says so. ``streamd check`` and the publisher ask the same question."""
    if endpoint_is_loopback(endpoint) or encrypted or allow_non_loopback:
        return None
    return (f"{endpoint} is not a loopback address; configure publisher.curve to encrypt it, or set "
            f"publisher.allow_non_loopback: true to publish unencrypted to the network")


PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_DOMAIN = "streamd"
KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_Z85_KEY_CHARS = 40     # 32 key bytes in Z85
_KEY_LINE = re.compile(r"^\s*(public-key|secret-key)\s*=\s*\"?([^\"\s]*)\"?\s*$")


class KeyFileError(StreamdError):
    """A key file or key folder is missing, unreadable, or holds no valid CURVE key."""


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded keys; ``secret`` is None for a public key file."""
    public: bytes
    secret: bytes | None = None

    def require_secret(self, path: Path | str) -> bytes:
        if self.secret is None:
            raise KeyFileError(f"{path}: holds no secret key (use the {SECRET_SUFFIX} file, not {PUBLIC_SUFFIX})")
        return self.secret


def curve_available() -> bool:
    return bool(zmq.has("curve"))


def _require_curve() -> None:
    if not curve_available():
        raise KeyFileError("this libzmq was built without CURVE support (zmq.has('curve') is false)")


# ---- key files ---------------------------------------------------------------------------------

def _banner(kind: str) -> str:
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if kind == "secret":
        return (f"#   ****  Generated on {when} by streamd  ****\n"
                "#   ZeroMQ CURVE **Secret** Certificate\n"
                "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n")
    return (f"#   ****  Generated on {when} by streamd  ****\n"
            "#   ZeroMQ CURVE Public Certificate\n"
            "#   Exchange securely, or use a secure mechanism to verify the contents\n"
            "#   of this file after exchange.\n\n")


def _certificate_text(kind: str, public: bytes, secret: bytes | None = None) -> str:
    text = _banner(kind) + "metadata\ncurve\n" + f'    public-key = "{public.decode("ascii")}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    return text


def _write_new(path: Path, text: str, mode: int, replace: bool) -> None:
    """Write ``text`` to ``path`` with ``mode`` from the first byte on, so a secret key is
    never readable by others, not even for an instant.

    Without ``replace`` the file is created exclusively (an existing file is never
    clobbered, even one that appeared a moment ago); with it, a temporary file is renamed
    over the old one so a reader sees the old key or the new one, never half of one."""
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)   # the umask may have taken bits a public file should keep
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        raise


def key_file_paths(directory: Path | str, name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}{PUBLIC_SUFFIX}", d / f"{name}{SECRET_SUFFIX}"


def generate_key_files(directory: Path | str, name: str, *, force: bool = False) -> tuple[Path, Path, bytes]:
    """Make a new key pair; return (public file, secret file, public key).

    Refuses to overwrite either file unless ``force``: replacing a key locks out every
    peer that trusts the old one."""
    _require_curve()
    if not KEY_NAME.match(name):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    public_path, secret_path = key_file_paths(directory, name)
    existing = [str(p) for p in (public_path, secret_path) if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                           f"pass --force to replace the key pair")
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        public, secret = zmq.curve_keypair()
        # Secret first: a public file without its secret would be a key nobody can use.
        _write_new(secret_path, _certificate_text("secret", public, secret), 0o600, replace=force)
        _write_new(public_path, _certificate_text("public", public), 0o644, replace=force)
    except FileExistsError as exc:
        raise KeyFileError(f"{exc.filename or public_path} appeared while writing keys; it was not replaced") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    return public_path, secret_path, public


def _check_key(path: Path, which: str, value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    try:
        ok = len(raw) == _Z85_KEY_CHARS and len(z85.decode(raw)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: {which} is not a {_Z85_KEY_CHARS}-character Z85 CURVE key")
    return raw


def load_key_file(path: Path | str) -> CurveKeys:
    """Read a ``.key`` or ``.key_secret`` file; a secret key must match its public key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{p}: key file not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"{p}: is a folder, not a key file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{p}: cannot read key file ({getattr(exc, 'strerror', None) or exc})") from None
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _KEY_LINE.match(line)
        if m:
            found[m.group(1)] = _check_key(p, m.group(1), m.group(2))
    if "public-key" not in found:
        raise KeyFileError(f"{p}: no public-key line (not a ZeroMQ CURVE certificate)")
    keys = CurveKeys(found["public-key"], found.get("secret-key"))
    if keys.secret is not None:
        _require_curve()
        if zmq.curve_public(keys.secret) != keys.public:
            raise KeyFileError(f"{p}: secret-key does not belong to public-key")
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            log.warning("secret key file %s is readable by other users (mode %o); chmod 600 it", p, mode)
    return keys


def load_secret_key_file(path: Path | str) -> CurveKeys:
    keys = load_key_file(path)
    keys.require_secret(path)
    return keys


def load_allowed_keys(directory: Path | str) -> dict[bytes, Path]:
    """Public keys of every ``*.key`` file in ``directory`` -> the file it came from.

    An empty folder is an error: a server that lets nobody in is a mistake, not a policy."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: allowed-clients folder not found" if not d.exists() else f"{d}: is not a folder")
    try:
        files = sorted(f for f in d.iterdir() if f.name.endswith(PUBLIC_SUFFIX) and f.is_file())
    except OSError as exc:
        raise KeyFileError(f"{d}: cannot list folder ({exc.strerror or exc})") from None
    if not files:
        raise KeyFileError(f"{d}: holds no client public keys (*{PUBLIC_SUFFIX} files)")
    return {load_key_file(f).public: f for f in files}


# ---- sockets -----------------------------------------------------------------------------------

class _AllowList:
    """ZAP credentials check: only the listed client keys get in."""

    def __init__(self, allowed: Iterable[bytes]) -> None:
        self.allowed = frozenset(allowed)
        self._denied_seen: set[bytes] = set()
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        # A refused client reconnects every reconnect interval: say it once per key.
        with self._lock:
            first = key not in self._denied_seen
            self._denied_seen.add(key)
        (log.warning if first else log.debug)("refused a CURVE client with unknown public key %s",
                                               key.decode("ascii", "replace"))
        return False


class ServerSecurity:
    """The running ZAP handler of one CURVE server socket; ``stop()`` ends its thread."""

    def __init__(self, authenticator: ThreadAuthenticator, allowed: int) -> None:
        self._auth: ThreadAuthenticator | None = authenticator
        self.allowed = allowed
        self._lock = threading.Lock()

    @property
    def thread(self) -> threading.Thread | None:
        return self._auth.thread if self._auth is not None else None

    def stop(self) -> None:
        with self._lock:
            auth, self._auth = self._auth, None
        if auth is not None:
            auth.stop()


def apply_server(sock: zmq.Socket, server_keys: CurveKeys, allowed_client_keys: Iterable[bytes]) -> ServerSecurity:
    """Make ``sock`` a CURVE server that admits only ``allowed_client_keys``.

    Call before ``bind``. The ZAP handler binds a fixed inproc address in the socket's
    context, so a context can hold one such server: give each its own context. Without a
    running handler libzmq would admit any client key, so the handler starts first."""
    _require_curve()
    secret = server_keys.require_secret("server key")
    allowed = list(allowed_client_keys)
    auth = ThreadAuthenticator(sock.context, log=logging.getLogger("streamd.security.zap"))
    try:
        auth.start()
    except zmq.ZMQError as exc:
        auth.stop()
        raise KeyFileError(f"cannot start the CURVE authenticator ({exc}); does this context already "
                           f"hold a CURVE server?") from None
    if auth.thread is not None:
        auth.thread.name = "curve-zap"
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList(allowed))
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, server_keys.public)
    return ServerSecurity(auth, len(allowed))


def apply_client(sock: zmq.Socket, server_public_key: bytes, client_keys: CurveKeys) -> None:
    """Make ``sock``'s next ``connect`` a CURVE client of the server with that public key.

    libzmq copies the options into each connection when ``connect`` is called, so one socket
    can connect to several servers with different keys by setting this before each."""
    _require_curve()
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, client_keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, client_keys.require_secret("client key"))
