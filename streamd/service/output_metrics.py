"""Metrics of the broker outputs (MQTT, Redis Streams): one collector over their counters.

Kept apart from metrics.py on purpose: it only turns ``{output: {counter: n}}`` into metric
families, so it moves with whatever registry the daemon uses.
"""

from __future__ import annotations

from typing import Callable, Mapping

from .metrics import MetricFamily

# (counter key, metric name, type, help)
OUTPUT_METRICS = (
    ("sent", "streamd_output_messages_sent_total", "counter", "Messages the broker took, per output."),
    ("dropped", "streamd_output_messages_dropped_total", "counter",
     "Messages lost before the broker took them: the output's queue was full while the broker was "
     "away (oldest dropped), or a connection died under them."),
    ("stale", "streamd_output_messages_stale_total", "counter",
     "Detections not sent: older than the age bound when their turn came."),
    ("reconnects", "streamd_output_reconnects_total", "counter", "Connections to the broker made again."),
    ("connected", "streamd_output_connected", "gauge", "1 while the output is connected to its broker."),
    ("queued", "streamd_output_queued_messages", "gauge", "Messages waiting in the output's queue."),
)


def output_families(counters: Mapping[str, Mapping[str, int]]) -> list[MetricFamily]:
    fams = []
    for key, name, type_, help_ in OUTPUT_METRICS:
        fam = MetricFamily(name, help_, type_)
        for output, values in counters.items():
            fam.add(values.get(key, 0), {"output": output})
        fams.append(fam)
    return fams


def output_collector(counters: Callable[[], Mapping[str, Mapping[str, int]]]) -> Callable[[], list[MetricFamily]]:
    def collect() -> list[MetricFamily]:
        return output_families(counters())
    return collect
