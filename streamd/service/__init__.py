"""The daemon around the pipeline: wiring and reload (``daemon``), systemd notify and watchdog
(``systemd``), the Prometheus endpoint (``metrics``), on-demand picture requests
(``requests``) and ``streamd doctor`` (``doctor``).
"""
