"""Tell *why* an RTSP camera would not open: refused, unreachable, bad password, wrong path.

OpenCV only says "not opened". One short DESCRIBE exchange, with the camera's own
credentials (Basic or Digest, as the camera asks), turns that into a reason a person can
act on. The reason never contains the credentials.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from urllib.parse import unquote, urlsplit


def _digest(user: str, pw: str, method: str, uri: str, challenge: str) -> str:
    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
    realm, nonce = fields.get("realm", ""), fields.get("nonce", "")
    ha1 = hashlib.md5(f"{user}:{realm}:{pw}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}"')


def _exchange(host: str, port: int, request: str, timeout: float) -> tuple[int, dict[str, str]]:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    m = re.match(r"RTSP/\d\.\d (\d{3})", lines[0] if lines else "")
    if not m:
        raise ConnectionError("the server did not answer like an RTSP server")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), v.strip())
    return int(m.group(1)), headers


def diagnose(url: str, timeout: float = 3.0) -> str:
    """A short, credential-free reason why ``url`` cannot be streamed (or "reachable")."""
    p = urlsplit(url)
    host, port = p.hostname or "", p.port or (322 if p.scheme == "rtsps" else 554)
    if p.scheme == "rtsps":
        return "TLS RTSP (rtsps) server did not open"
    user, pw = unquote(p.username or ""), unquote(p.password or "")
    clean = f"{p.scheme}://{host}:{port}{p.path or '/'}" + (f"?{p.query}" if p.query else "")

    def describe(auth: str | None) -> tuple[int, dict[str, str]]:
        req = f"DESCRIBE {clean} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n"
        if auth:
            req += f"Authorization: {auth}\r\n"
        return _exchange(host, port, req + "User-Agent: streamd\r\n\r\n", timeout)

    try:
        status, headers = describe(None)
        if status == 401 and (user or pw):
            challenge = headers.get("www-authenticate", "")
            if challenge.lower().startswith("digest"):
                auth = _digest(user, pw, "DESCRIBE", clean, challenge)
            else:
                auth = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
            status, headers = describe(auth)
            if status == 401:
                return "authentication failed: the camera refused the username/password (401)"
    except ConnectionRefusedError:
        return f"connection refused by {host}:{port} (camera offline or wrong port)"
    except socket.timeout:
        return f"no answer from {host}:{port} within {timeout:g}s (unreachable or stalled)"
    except socket.gaierror:
        return f"host name '{host}' does not resolve"
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or type(exc).__name__})"
    if status == 401:
        return "authentication required: the camera asks for a username/password (401)"
    if status == 404:
        return f"stream path '{p.path}' not found on the camera (404)"
    if status >= 400:
        return f"camera answered RTSP status {status}"
    return "reachable"
