"""Log set-up for every ``streamd`` command: ``key=value`` text (journald, grep) or JSON lines.

Structured fields travel on the record (``log.warning("camera state", extra={"camera": ..,
"state": ..})``): the text format appends them as ``key=value`` after the message, quoting a
value that has spaces, quotes or ``=`` so the line parses back; the JSON format puts them in
the object. Both formats scrub credentials (``streamd.redact``) from the whole line.

The JSON formatter is the standard library's ``json.dumps`` of a dict: one object per line
needs nothing more, and python-json-logger would add a runtime dependency on edge boxes while
we would still have to scrub and select the fields ourselves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import IO, Any

from .redact import scrub

FORMATS: tuple[str, ...] = ("text", "json")
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

# Everything a LogRecord carries by itself; any other attribute came in through ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_BARE_VALUE = re.compile(r'^[^\s"=\\]+$')


def quote_value(value: Any) -> str:
    """A value as it goes after ``key=``: bare when it has no space, quote, backslash or
    ``=``; otherwise a double-quoted string with JSON escapes (logfmt parsers read those)."""
    text = "-" if value is None else str(value)
    if _BARE_VALUE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_fields(fields: dict[str, Any]) -> str:
    """``camera=door reason="no route to host"``."""
    return " ".join(f"{k}={quote_value(v)}" for k, v in fields.items())


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields given to the log call with ``extra=``, in the order given, with
    credentials scrubbed from each value *before* it is quoted or JSON-escaped (escaping a
    password's quote or backslash would hide it from the scrubber)."""
    return {k: v if isinstance(v, (bool, int, float, type(None))) else scrub(str(v))
            for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


# sd-daemon(3) priority prefixes: journald takes a line's priority from them (and strips
# them), which is what lets `journalctl -p warning` pick out camera failures.
_JOURNAL_PRIORITY = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def writes_to_journal(stream: IO[str]) -> bool:
    """systemd sets JOURNAL_STREAM=DEVICE:INODE for a service whose output goes to the journal
    (systemd.exec(5)); the stream is journald's when its file matches."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):    # not a real file (a test's StringIO)
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def with_priority(line: str, levelno: int) -> str:
    """Every physical line (a traceback's too) gets the record's journald priority."""
    prio = next((p for level, p in _JOURNAL_PRIORITY if levelno >= level), 7)
    return "\n".join(f"<{prio}>{part}" for part in line.split("\n"))


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message key=value ...``, scrubbed."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        fields = record_fields(record)
        if fields:
            # Fields go before a traceback, on the message's own line, so grep finds them.
            head, sep, rest = line.partition("\n")
            line = f"{head} {format_fields(fields)}{sep}{rest}"
        return with_priority(line, record.levelno) if self.journal else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the fields, exception text."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for k, v in record_fields(record).items():
            obj.setdefault(k, v)
        if record.exc_info:
            obj["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            obj["exception"] = scrub(record.exc_text)
        line = json.dumps(obj, ensure_ascii=False)
        return with_priority(line, record.levelno) if self.journal else line


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one that writes ``fmt`` lines to ``stream``
    (stdout by default: journald under systemd, with each line's priority)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = sys.stdout if stream is None else stream
    journal = writes_to_journal(out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
