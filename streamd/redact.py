"""Keep camera credentials out of every log line, message, metric and exception.

Two layers, because third-party code (FFmpeg, OpenCV) builds its own strings from URLs:
1. ``redact_url`` masks what we print ourselves;
2. every secret the config holds is registered here, and ``scrub`` removes it (plain and
   URL-encoded) from any text that leaves the process through our log formatters
   (``streamd.logs``) or socket.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, unquote, urlsplit

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"

_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|pass|token|auth|key|user|username)=)[^&#]*")


def register_secret(value: str | None) -> None:
    """Remember a credential so ``scrub`` hides it wherever it shows up."""
    if not value or len(value) < 3:  # too short to scrub without mangling ordinary text
        return
    with _lock:
        _secrets.update({value, quote(value, safe=""), unquote(value)})


def register_url(url: str) -> None:
    """Register the userinfo (and secret-looking query values) of ``url``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if parts.password:
        register_secret(parts.password)
    if parts.username and parts.password:
        register_secret(f"{parts.username}:{parts.password}")
    for m in _QUERY_SECRET.finditer(url):
        register_secret(url[m.end(1): m.end()])


def redact_url(url: str) -> str:
    """``rtsp://user:pw@host/x?token=y`` -> ``rtsp://***@host/x?token=***``."""
    out = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", lambda m: m.group(1) + MASK + "@", url)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, out)


def scrub(text: str) -> str:
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    # URLs we never registered (e.g. from a reloaded config) still lose their userinfo.
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", lambda m: m.group(1) + MASK + "@", text)

