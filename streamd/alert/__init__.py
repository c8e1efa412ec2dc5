"""``streamd alert``: rules over the daemon's detections -> alerts on stdout, webhooks, programs.

- ``rules``: the rules file (typed, validated, line-numbered errors)
- ``engine``: messages in, alerts and notices out (pure logic)
- ``sinks``: stdout, webhook and command outputs (slow ones on their own thread)
- ``runner``: the subscriber loop behind ``streamd alert`` (its arguments: ``streamd.cli.alert``,
  which imports this package; nothing here imports ``streamd.cli``)
"""
