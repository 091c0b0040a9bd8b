"""Prometheus series. One `Metrics` per process, handed to whoever records (no module globals)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Probes and scrapes every few seconds are not worth a log line each."""


# model -> (last use, epoch seconds) for the models this process sees as loaded.
IdleSource = Callable[[], dict[str, float]]


class _IdleCollector(Collector):
    def __init__(self, source: IdleSource) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modelium_model_idle_seconds",
            "Seconds since a loaded model last served a request (or was loaded)",
            labels=["model"],
        )
        now = time.time()
        for model, last_use in sorted(self._source().items()):
            family.add_metric([model], max(0.0, now - last_use))
        yield family


# phase -> how many models are in it, as this process last listed them (empty: not listed yet).
PhaseSource = Callable[[], dict[str, int]]


class _PhaseCollector(Collector):
    def __init__(self, source: PhaseSource) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("modelium_models", "Registered models by lifecycle phase", labels=["phase"])
        for phase, count in sorted(self._source().items()):
            family.add_metric([phase], count)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # organizationId: the organization of the request's API key ("anonymous" without keys).
        self.requests = Counter(
            "modelium_requests",
            "Inference requests through the gateway",
            ["model", "runtime", "status", "organizationId"],
            registry=r,
        )
        self.request_duration = Histogram(
            "modelium_request_duration_seconds",
            "Gateway inference request latency",
            ["model", "runtime"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge("modelium_models_loaded", "Models loaded on a node", ["runtime", "node"], registry=r)
        self.load_duration = Histogram(
            "modelium_model_load_duration_seconds",
            "Time from load start to a healthy endpoint",
            ["model", "runtime"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.cold_start_wait = Histogram(
            "modelium_cold_start_wait_seconds",
            "Time a request waited for its model to load",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.requests_waiting = Gauge(
            "modelium_requests_waiting", "Requests waiting for their model to load", ["model"], registry=r
        )
        self.unloads = Counter("modelium_unloads", "Models unloaded, by reason", ["reason"], registry=r)
        self.model_memory = Gauge(
            "modelium_model_memory_bytes",
            "Memory a model needs: estimated before its load, measured after",
            ["model", "kind"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            "modelium_gpu_memory_bytes",
            "Device memory of a node: total, used (NVML), booked by models",
            ["node", "gpu", "kind"],
            registry=r,
        )
        self.brain_decisions = Counter(
            "modelium_brain_decisions",
            "Placement decisions, by runtime and by who decided (rules or llm)",
            ["runtime", "source"],
            registry=r,
        )
        self.updates = Counter(
            "modelium_model_updates",
            "New versions of a loaded model: switched beside the old one, failed (the old one kept "
            "serving) or recreated (taken down, then loaded)",
            ["model", "result"],
            registry=r,
        )
        self.evictions = Counter(
            "modelium_evictions", "Idle models unloaded to make room for another", ["node"], registry=r
        )
        self.temporal_up = Gauge(
            "modelium_temporal_up", "Whether this process reaches Temporal now (1) or not (0)", registry=r
        )
        self._idle_collector: _IdleCollector | None = None
        self._phase_collector: _PhaseCollector | None = None

    def track_idle(self, source: IdleSource) -> None:
        """Report `modelium_model_idle_seconds` from `source` at every scrape."""
        if self._idle_collector is not None:
            self.registry.unregister(self._idle_collector)
        self._idle_collector = _IdleCollector(source)
        self.registry.register(self._idle_collector)

    def track_phases(self, source: PhaseSource) -> None:
        """Report `modelium_models{phase}` from `source` at every scrape."""
        if self._phase_collector is not None:
            self.registry.unregister(self._phase_collector)
        self._phase_collector = _PhaseCollector(source)
        self.registry.register(self._phase_collector)

    def serve(self, host: str, port: int, ready: Callable[[], str | None] | None = None) -> Any:
        """Expose /metrics, and /health and /ready for probes, on host:port in a background thread;
        returns the HTTP server. `ready` says why the process is not ready (None: it is)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/health", "/ready"):
                reason = ready() if ready is not None and path == "/ready" else None
                status = "200 OK" if reason is None else "503 Service Unavailable"
                body = json.dumps({"status": "ok"} if reason is None else {"status": "unavailable", "detail": reason})
                start_response(status, [("Content-Type", "application/json")])
                return [body.encode()]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%s/metrics", host, server.server_port)
        return server
