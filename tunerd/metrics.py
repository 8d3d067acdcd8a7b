"""Prometheus metrics of the daemon: requests, latency, lookups, and store/worker gauges read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from tunerd.db.errors import StoreError

if TYPE_CHECKING:
    from .api.state import Service


class Metrics:
    """Per-app Prometheus registry: request counts and latency, lookup hits/misses, store gauges."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tunerd_http_requests", "HTTP requests served", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "tunerd_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.lookups = Counter("tunerd_lookup_specs", "specs looked up, by result", ["result"], registry=self.registry)
        self.registry.register(_StoreCollector(service))


class MetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "<unmatched>"  # route templates only, never raw paths
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


class _StoreCollector:
    """Queue depth, trials by status and the worker's counters, read at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self):
        up = GaugeMetricFamily("tunerd_store_up", "1 when the database answered this scrape")
        try:
            depth = self.service.store.queue_depth()
            tasks = self.service.store.queued_tasks()
            trials = self.service.store.trial_counts()
        except StoreError:
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield GaugeMetricFamily("tunerd_queue_depth", "queued tuning jobs", value=depth)
            yield GaugeMetricFamily("tunerd_queued_tasks", "queued tasks of fanned-out jobs", value=tasks)
            g = GaugeMetricFamily("tunerd_trials", "trials in the store, by status", labels=["status"])
            for status, n in trials.items():
                g.add_metric([status], n)
            yield g
        worker = self.service.worker
        if worker is not None:
            st = worker.status()
            yield GaugeMetricFamily(
                "tunerd_worker_busy", "1 while the worker runs a job", value=0 if st["current_job"] is None else 1
            )
            g = GaugeMetricFamily("tunerd_worker_jobs", "jobs this daemon's worker finished", labels=["outcome"])
            g.add_metric(["done"], st["jobs_done"])
            g.add_metric(["failed"], st["jobs_failed"])
            yield g
