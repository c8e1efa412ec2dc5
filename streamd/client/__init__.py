"""Programs that speak only the published protocol: ``streamd sub`` (``subscriber``),
``streamd status``, ``streamd detect``, ``streamd relay``, and box drawing (``annotate``).
"""
