"""Redis Streams output (redis-py): every message appended with ``XADD <key_prefix>:<origin>:<kind>
MAXLEN ~ N``, so consumers that were away resume from their last id (docs/OUTPUTS.md).

Entries are written in pipelined batches from this output's own thread; a batch a lost
connection did not confirm goes back to the front of the queue and is written again after
the reconnect (at least once: an entry Redis took just before the link died can appear twice).
"""

from __future__ import annotations

import logging

import redis

from ..config import RedisOutputConfig
from ..redact import redact_url, scrub
from .base import Outbound
from .worker import ConnectionLost, QueuedOutput

log = logging.getLogger("streamd.outputs.redis")

BATCH = 256
STREAMS = {"detections": "detections", "event": "events", "health": "health", "stats": "stats"}
TIMEOUT_S = 5.0


class RedisStreamsOutput(QueuedOutput):
    def __init__(self, cfg: RedisOutputConfig, origin: str) -> None:
        super().__init__("redis", origin, cfg.queue_size, cfg.backoff_initial_s, cfg.backoff_max_s)
        self.cfg = cfg
        self.prefix = f"{cfg.key_prefix}:{origin}"
        self._password = cfg.read_password()
        self._redis: redis.Redis | None = None
        self._refused_logged = False

    def stream(self, kind: str) -> str:
        return f"{self.prefix}:{STREAMS[kind]}"

    def wants(self, msg: Outbound) -> bool:
        if msg.kind not in self.cfg.kinds:
            return False
        return not (self.cfg.only_non_empty and msg.kind == "detections" and not msg.body.get("detections"))

    def _where(self) -> str:
        return redact_url(self.cfg.url)

    def _open(self) -> None:
        extra = {k: v for k, v in (("username", self.cfg.username), ("password", self._password)) if v is not None}
        self._redis = redis.Redis.from_url(self.cfg.url, socket_timeout=TIMEOUT_S,
                                           socket_connect_timeout=TIMEOUT_S, **extra)
        self._redis.ping()

    def _serve(self) -> None:
        assert self._redis is not None
        while not self.draining_done():
            batch = self.take(BATCH)
            if not batch:
                self.wait_for_work(0.2)
                continue
            pipe = self._redis.pipeline(transaction=False)
            for msg in batch:
                fields = self._fields(msg)
                if fields is not None:
                    pipe.xadd(self.stream(msg.kind), fields, maxlen=self.cfg.maxlen, approximate=True)
            try:
                replies = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.put_back(batch)
                raise ConnectionLost(str(exc)) from None
            failed = [r for r in replies if isinstance(r, Exception)]
            self.sent += len(replies) - len(failed)
            if failed:
                # The server refused these entries (e.g. the key holds another type): writing
                # them again would fail again, so they are dropped and said once.
                self.dropped += len(failed)
                if not self._refused_logged:
                    log.warning("output=redis refused %d entr(ies): %s", len(failed), scrub(str(failed[0])))
                    self._refused_logged = True

    def _release(self, clean: bool) -> None:
        if self._redis is not None:
            try:
                self._redis.close()
            except redis.RedisError:
                pass
            self._redis = None

    def _fields(self, msg: Outbound) -> dict[str, str | bytes | int] | None:
        body = self.encode(msg)
        if body is None:
            return None
        fields: dict[str, str | bytes | int] = {"type": str(msg.body.get("type", msg.kind)), "origin": self.origin}
        if msg.kind != "stats":
            fields["camera"] = msg.key
        if msg.kind == "detections":
            fields["count"] = len(msg.body.get("detections", ()))
        fields["body"] = body
        if msg.attachment is not None and self.cfg.snapshots:
            fields["snapshot"] = msg.attachment
        return fields
