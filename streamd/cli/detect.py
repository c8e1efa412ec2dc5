"""``streamd detect``: submit pictures to a running daemon and print their detections."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _cmd_detect(args: argparse.Namespace) -> int:
    from ..client.detect import run_detect
    from ..redact import redact_url
    if args.redis is not None:
        from ..redact import register_url
        register_url(args.redis)    # a password in the URL stays out of every message
        try:
            import redis  # noqa: F401 - only to say what is missing before anything starts
        except ImportError:
            print("streamd detect: error: --redis needs redis-py: pip install 'streamd[redis]'", file=sys.stderr)
            return 2
        if not args.redis.startswith(("redis://", "rediss://", "unix://")):
            print(f"streamd detect: error: --redis must start with redis://, rediss:// or unix:// "
                  f"(got {redact_url(args.redis)})", file=sys.stderr)
            return 2
    if args.http is not None and args.redis is not None:
        print("streamd detect: error: --http and --redis are two different ways in: give one", file=sys.stderr)
        return 2
    if args.http is not None and not args.http.startswith(("http://", "https://")):
        print(f"streamd detect: error: --http must start with http:// or https:// (got {redact_url(args.http)})",
              file=sys.stderr)
        return 2
    return run_detect(args.images, args.endpoint, args.priority, args.conf, args.out, args.timeout,
                      args.json, args.client_id, redis_url=args.redis, stream=args.stream, http_url=args.http)


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    d = subparsers.add_parser("detect", help="submit images to a running daemon and print detections")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    d.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="the daemon's requests.endpoint")
    d.add_argument("--redis", metavar="URL", help="submit through a fleet's Redis request stream instead "
                                                  "(requests.redis.url of the daemons)")
    d.add_argument("--http", metavar="URL", help="submit through the daemon's HTTP API instead "
                                                "(e.g. http://127.0.0.1:9108; a token from $STREAMD_HTTP_TOKEN)")
    d.add_argument("--stream", default="streamd:requests", help="with --redis: requests.redis.stream")
    d.add_argument("--priority", type=int, default=0, help="-10..10, higher first")
    d.add_argument("--conf", type=float, help="confidence threshold for these images")
    d.add_argument("--client-id", help="names this client in metrics and the PUB topic")
    d.add_argument("--out", metavar="DIR", help="write annotated pictures here")
    d.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    d.add_argument("--json", action="store_true", help="one JSON object per image")
    d.set_defaults(func=_cmd_detect)
