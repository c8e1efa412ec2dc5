"""Metrics of the broker outputs (MQTT, Redis Streams): one collector over their counters.

Kept apart from metrics.py: it only turns ``{output: {counter: n}}`` into metric families,
read at scrape time from the outputs' own counters (they count in their threads).
"""

from __future__ import annotations

from typing import Callable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# (counter key, metric name without _total, counter or gauge, help)
OUTPUT_METRICS = (
    ("sent", "streamd_output_messages_sent", "counter", "Messages the broker took, per output."),
    ("dropped", "streamd_output_messages_dropped", "counter",
     "Messages lost before the broker took them: the output's queue was full while the broker was "
     "away (oldest dropped), or a connection died under them."),
    ("stale", "streamd_output_messages_stale", "counter",
     "Detections not sent: older than the age bound when their turn came."),
    ("reconnects", "streamd_output_reconnects", "counter", "Connections to the broker made again."),
    ("connected", "streamd_output_connected", "gauge", "1 while the output is connected to its broker."),
    ("queued", "streamd_output_queued_messages", "gauge", "Messages waiting in the output's queue."),
)


class OutputCollector:
    def __init__(self, counters: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._counters = counters

    def _families(self) -> list[Metric]:
        return [(CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_, labels=["output"])
                for _, name, kind, help_ in OUTPUT_METRICS]

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        fams = self._families()
        for (key, *_), fam in zip(OUTPUT_METRICS, fams):
            for output, values in self._counters().items():
                fam.add_metric([output], float(values.get(key, 0)))
        return fams
