"""Request sizes at and beyond the limits, sent for real to a daemon process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_requests import Client, request_config, wait_ready, zctx  # noqa: F401 - zctx: a fixture


@pytest.mark.slow
def test_a_50_mb_request_is_answered_with_an_error_and_a_larger_one_closes_only_its_connection(
        fall_onnx_320: Path, sample_images, daemon_factory, zctx) -> None:
    small = sample_images[1].read_bytes()
    cfg = request_config(fall_onnx_320, [], max_message_bytes=60_000_000)
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    wait_ready(d, ep, zctx, small)
    c = Client(ep, zctx)
    c.send(os.urandom(50 * 1024 * 1024), request_id="fifty")
    c.wait(lambda: c.of("error"), 60, f"an answer to the 50 MB picture\n{d.log()[-1500:]}")
    assert c.of("error")[0]["request_id"] == "fifty"
    assert "image of 52428800 bytes is larger than the limit of 20000000" in c.of("error")[0]["error"]
    # Over max_message_bytes ZeroMQ drops the connection unread: no reply, but the daemon
    # and the client's next requests go on.
    over = Client(ep, zctx)
    over.send(os.urandom(61_000_000), request_id="over")
    other = Client(ep, zctx)
    other.send(small, request_id="meanwhile")
    other.wait(lambda: other.of("result"), 60, "the other client's result")
    over.send(small, request_id="after")
    over.wait(lambda: over.of("result"), 60, "a result on the dropped client's next request")
    assert all(r.get("request_id") != "over" for _, r in over.replies)
    assert d.stop() == 0
