"""What a reload (SIGHUP) changes, decided as plain functions of the old and new config;
the daemon applies the decision (service/daemon.py ``Daemon.reload``)."""

from __future__ import annotations

import logging

from ..config import Config

log = logging.getLogger("streamd.daemon")

# Sections bound to sockets or connections opened at start: a reload keeps their running
# values (with a warning) rather than drop subscribers or broker sessions mid-flight.
RESTART_ONLY = {"publisher": "the socket stays as is", "outputs": "connections stay as they are",
                "http": "the server stays as is", "metrics": "the server stays as is"}


def keep_restart_only_sections(old: Config, new: Config) -> Config:
    """``new`` with the restart-only sections of ``old``; each one that differed is logged."""
    for section, what in RESTART_ONLY.items():
        if getattr(new, section) != getattr(old, section):
            log.warning("%s settings changed: they apply at the next restart (%s)", section, what)
            new = new.model_copy(update={section: getattr(old, section)})
    if snapshots_on(new) and not snapshots_on(old):
        # The subscribers' queues were sized at start for detections alone (outputs.zmq_publisher).
        log.warning("snapshots turned on by a reload: a subscriber that stops reading is held to "
                    "publisher.subscriber_buffer_mb only after a restart")
    return new


# Camera keys the output stage applies live: a change of them alone does not restart the camera.
OUTPUT_STAGE_KEYS = {"tracking": None, "zones": {}}


def snapshots_on(cfg: Config) -> bool:
    """Whether any enabled camera attaches snapshots."""
    return any(c.enabled and c.snapshot != "off" for c in cfg.cameras)


def camera_changes(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """(removed, changed, added) camera ids among the enabled ones; a change of the shared
    ``sources`` settings restarts every camera that stays. Tracking and zones are not the
    decoder's business: a change of only those leaves the camera running."""
    old_cams = {c.id: c.model_copy(update=OUTPUT_STAGE_KEYS) for c in old.cameras if c.enabled}
    new_cams = {c.id: c.model_copy(update=OUTPUT_STAGE_KEYS) for c in new.cameras if c.enabled}
    sources_changed = new.sources != old.sources
    removed = [cid for cid in old_cams if cid not in new_cams]
    changed = [cid for cid in new_cams if cid in old_cams and (new_cams[cid] != old_cams[cid] or sources_changed)]
    added = [cid for cid in new_cams if cid not in old_cams]
    return removed, changed, added
