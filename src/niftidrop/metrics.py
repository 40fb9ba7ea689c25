"""Prometheus metrics and the `/metrics` + `/healthz` endpoint (README: Metrics).

The same server answers the paths of the status page (`pages`, given by the
service: `niftidrop.status_page`).

The service counts what it does through one `Metrics` object; with
`metrics_address` set it also calls `serve()`, which answers scrapes on a small
threaded HTTP server of its own. The exposition format is produced by the
maintained Prometheus client library, so scrapers see exactly what they expect
(including OpenMetrics when they ask for it).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from niftidrop.setting_types import parse_address

# Conversion times range from a few milliseconds (small label maps) to minutes
# (multi-gigabyte probability maps), so the buckets span that whole range.
CONVERSION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
SHUTDOWN_POLL_SECONDS = 0.1

# More pages on the same server: a path's (status, body, content type), None if not one.
Pages = Callable[[str], tuple[HTTPStatus, bytes, str] | None]


class _MetricsServer(ThreadingHTTPServer):
    """Answers scrapes; one short-lived thread per request, none outlives the process."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        pages: Pages | None = None,
    ) -> None:
        # The family follows the host, so "[::1]:9464" binds IPv6 and
        # "127.0.0.1:9464" IPv4; the class attribute is what `server_bind` reads.
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[
            0
        ][0]
        self.registry = registry
        self.healthy = healthy
        self.pages = pages
        super().__init__(address, _ScrapeHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's full DNS name, which can
        # stall on a machine without DNS; nothing here needs that name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _ScrapeHandler(BaseHTTPRequestHandler):
    """GET /metrics, GET /healthz and the server's `pages`; everything else is 404."""

    server: _MetricsServer
    server_version = "niftidrop"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == METRICS_PATH:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(HTTPStatus.OK, encoder(self.server.registry), content_type)
        elif path == HEALTH_PATH:
            if self._is_healthy():
                self._reply(HTTPStatus.OK, b"ok\n")
            else:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, b"unhealthy\n")
        elif self.server.pages is not None and (page := self.server.pages(path)) is not None:
            self._reply(*page)
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")

    def _is_healthy(self) -> bool:
        # A failing health probe must answer 503, not drop the connection.
        try:
            return bool(self.server.healthy())
        except Exception:
            return False

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")  # HTML and PNG as labelled
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the service's JSON log on stderr.
        return


class Metrics:
    """The service's counters, histogram and gauges, and their HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            # A registry of our own (tests create many Metrics); it also reports
            # the process's memory, CPU and open files, as Prometheus users expect.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self._converted = Counter(
            "niftidrop_inputs_converted",
            "Inputs converted to NIfTI.",
            registry=registry,
        )
        self._failed = Counter(
            "niftidrop_inputs_failed",
            "Inputs moved to failed, by error code.",
            ["code"],
            registry=registry,
        )
        self._seconds = Histogram(
            "niftidrop_conversion_seconds",
            "Time to convert one input, from claim to durable output.",
            buckets=CONVERSION_BUCKETS,
            registry=registry,
        )
        self._queue_depth = Gauge(
            "niftidrop_queue_depth",
            "Complete inputs waiting to be converted.",
            registry=registry,
        )
        self._library_size = Gauge(
            "niftidrop_library_references",
            "Reference images in the library index.",
            registry=registry,
        )
        self._server: _MetricsServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def observe_converted(self, seconds: float) -> None:
        """Count one converted input and record how long it took."""
        self._converted.inc()
        self._seconds.observe(seconds)

    def observe_failed(self, code: str) -> None:
        """Count one input rejected with the error `code` (README: error codes)."""
        self._failed.labels(code=code).inc()

    def set_queue_depth(self, depth: int) -> None:
        """Record how many inputs are waiting."""
        self._queue_depth.set(depth)

    def set_library_size(self, size: int) -> None:
        """Record how many references the library index holds."""
        self._library_size.set(size)

    def serve(self, address: str, healthy: Callable[[], bool], pages: Pages | None = None) -> None:
        """Answer `/metrics`, `/healthz` (and `pages`) on `address` ("host:port") in a thread.

        `healthy()` is asked on every `/healthz` request: 200 "ok" when it is
        true, 503 otherwise. Port 0 picks a free port (see `port`). Raises
        `OSError` when the address cannot be bound.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"metrics: already serving on port {self.port}")
            server = _MetricsServer(parse_address(address), self.registry, healthy, pages)
            thread = threading.Thread(
                target=server.serve_forever,
                # How often the loop checks for close(): keeps a stop short.
                kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
                name="niftidrop-metrics",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread

    @property
    def port(self) -> int | None:
        """The TCP port being served, or None when not serving."""
        server = self._server
        return None if server is None else int(server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()
