"""One exception hierarchy for the whole daemon.

Every error a user can cause (bad config, bad model file, unreachable camera) is a
``StreamdError`` whose message already names *what* and *where*, so the CLI can print
it as one line without a traceback.
"""

from __future__ import annotations


class StreamdError(Exception):
    """Base class of every error streamd raises on purpose."""


class ConfigError(StreamdError):
    """A config file (or a value in it) is invalid.

    ``field`` is the dotted path of the offending value (``cameras[2].url``) and
    ``line`` its 1-based line in the YAML file, when known.
    """

    def __init__(self, message: str, *, source: str | None = None,
                 field: str | None = None, line: int | None = None) -> None:
        self.source = source
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if source:
            where.append(f"{source}:{line}" if line else source)
        if field:
            where.append(field)
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ModelError(StreamdError):
    """A model file is missing, unreadable, or not what its manifest says."""


class ManifestError(ModelError):
    """A model manifest is missing fields, malformed, or disagrees with its model."""


class BackendError(StreamdError):
    """An inference backend failed to load or to run a batch."""


class SourceError(StreamdError):
    """A camera source could not be opened or read (message never holds credentials)."""


class PublishError(StreamdError):
    """The publisher could not bind or send."""


class ExportError(StreamdError):
    """The export tool could not turn its input into the requested model."""
