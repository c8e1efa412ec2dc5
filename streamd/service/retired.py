"""Retired decoders that have not exited yet.

A decoder retired by a reload may be blocked in a native read that only its own timeout
ends. Its camera id's next decoder must not start beside it (one live decoder per camera
id), so the daemon keeps the retirees here and starts the successor once they are gone.
"""

from __future__ import annotations

import threading


class RetiredDecoders:
    def __init__(self) -> None:
        self._by_camera: dict[str, list[threading.Thread]] = {}

    def add(self, camera_id: str, decoder: threading.Thread) -> None:
        self._by_camera.setdefault(camera_id, []).append(decoder)

    def alive(self, camera_id: str) -> bool:
        """Whether a retired decoder of ``camera_id`` still runs (forgets those that ended)."""
        alive = [t for t in self._by_camera.get(camera_id, []) if t.is_alive()]
        if alive:
            self._by_camera[camera_id] = alive
        else:
            self._by_camera.pop(camera_id, None)
        return bool(alive)
