"""Shared fixtures: models (tests/fixtures_models.py), RTSP cameras (tests/fixtures_rtsp.py),
and the daemon run as a real process (tests/fixtures_daemon.py)."""

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_rtsp", "tests.fixtures_daemon"]
