"""A Ray Serve replica's ``caldera_`` metrics, exported through Ray's metrics agent.

Every replica keeps the Prometheus registry of ``caldera serve`` (api/metrics.py). Behind Serve's
router, ``GET /metrics`` reaches one replica at random, so a scrape of it would see a different
replica each time. Instead each replica copies its registry, every few seconds, into
``ray.util.metrics`` gauges; the Ray metrics agent of its node serves them with those of every
other replica on the node, at the port Prometheus already scrapes for Ray (``ray start
--metrics-export-port``, 8080 under KubeRay).

    replica registry --every EXPORT_INTERVAL s--> ray.util.metrics.Gauge --> node's metrics agent
    caldera_x{model_name}                           ray_caldera_x{model_name, application,
                                                                   deployment, replica, ...}

Each sample becomes a gauge of the same name holding the sample's value: counter totals,
histogram ``_bucket`` / ``_sum`` / ``_count`` series and gauges alike. Ray's own Counter and
Histogram take increments and single observations, so a replica's histograms could not be moved
over bucket by bucket; a gauge carries the cumulative value exactly, and PromQL's ``rate`` and
``histogram_quantile`` read it as they read the direct endpoint. Ray prefixes the names with
``ray_``; deploy/prometheus/prometheus.yml strips that prefix from ``ray_caldera_`` series, so
the Grafana dashboard's queries serve both ``caldera serve`` and Ray Serve.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

EXPORT_INTERVAL = 5.0


class RayMetricsExporter:
    """Copies ``registry`` into Ray gauges; ``tags`` are added to every series (they tell the
    replicas apart)."""

    def __init__(self, registry: CollectorRegistry, tags: dict[str, str]) -> None:
        self.registry = registry
        self.tags = dict(tags)
        self._gauges: dict[str, object] = {}

    def export(self) -> None:
        """One copy of every sample."""
        from ray.util.metrics import Gauge

        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps, not values
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation,
                                  tag_keys=(*sorted(sample.labels), *self.tags))
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags={**sample.labels, **self.tags})

    async def run(self, interval: float = EXPORT_INTERVAL) -> None:
        """Exports every ``interval`` seconds until cancelled."""
        while True:
            try:
                self.export()
            except Exception:  # a metrics failure must not stop the replica
                logger.exception("exporting the replica's metrics to Ray failed")
            await asyncio.sleep(interval)
