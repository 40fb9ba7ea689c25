"""Tests for niftidrop.metrics: values, and real scrapes of /metrics and /healthz."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from niftidrop.metrics import Metrics

# Scrapes go straight to loopback, whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(
    port: int, path: str, accept: str | None = None, host: str = "127.0.0.1"
) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://<host>:<port><path>."""
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    """A Metrics object that is closed after the test."""
    instance = Metrics()
    yield instance
    instance.close()


def _serve(metrics: Metrics, healthy: bool = True) -> int:
    metrics.serve("127.0.0.1:0", lambda: healthy)
    assert metrics.port is not None
    return metrics.port


class TestValues:
    def test_converted_counts_and_times(self, metrics: Metrics) -> None:
        """observe_converted increments the counter and feeds the histogram."""
        metrics.observe_converted(0.2)
        metrics.observe_converted(3.0)
        value = metrics.registry.get_sample_value
        assert value("niftidrop_inputs_converted_total") == 2
        assert value("niftidrop_conversion_seconds_count") == 2
        assert value("niftidrop_conversion_seconds_sum") == pytest.approx(3.2)
        assert value("niftidrop_conversion_seconds_bucket", {"le": "0.25"}) == 1
        assert value("niftidrop_conversion_seconds_bucket", {"le": "+Inf"}) == 2

    def test_failed_counts_by_code(self, metrics: Metrics) -> None:
        """observe_failed keeps one counter per error code."""
        metrics.observe_failed("shape_mismatch")
        metrics.observe_failed("shape_mismatch")
        metrics.observe_failed("no_reference")
        value = metrics.registry.get_sample_value
        assert value("niftidrop_inputs_failed_total", {"code": "shape_mismatch"}) == 2
        assert value("niftidrop_inputs_failed_total", {"code": "no_reference"}) == 1

    def test_gauges_hold_the_last_value(self, metrics: Metrics) -> None:
        """Queue depth and library size report what was set last, not a sum."""
        metrics.set_queue_depth(7)
        metrics.set_queue_depth(3)
        metrics.set_library_size(120)
        value = metrics.registry.get_sample_value
        assert value("niftidrop_queue_depth") == 3
        assert value("niftidrop_library_references") == 120

    def test_each_instance_has_its_own_registry(self) -> None:
        """Two Metrics objects never share counts (tests create many)."""
        first, second = Metrics(), Metrics()
        first.observe_converted(1.0)
        assert second.registry.get_sample_value("niftidrop_inputs_converted_total") == 0

    def test_uses_a_given_registry(self) -> None:
        """A registry passed in receives the metrics."""
        registry = CollectorRegistry()
        Metrics(registry).set_library_size(5)
        assert registry.get_sample_value("niftidrop_library_references") == 5


class TestServe:
    def test_scrape_returns_prometheus_text(self, metrics: Metrics) -> None:
        """GET /metrics answers the text format with the service's metrics in it."""
        metrics.observe_converted(0.5)
        metrics.observe_failed("truncated")
        metrics.set_queue_depth(4)
        status, content_type, body = _get(_serve(metrics), "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        families = {family.name: family for family in text_string_to_metric_families(body)}
        assert families["niftidrop_inputs_converted"].samples[0].value == 1
        failed = families["niftidrop_inputs_failed"].samples[0]
        assert failed.labels == {"code": "truncated"}
        assert families["niftidrop_queue_depth"].samples[0].value == 4
        assert "niftidrop_conversion_seconds" in families
        assert "process_resident_memory_bytes" in body

    def test_scrape_speaks_openmetrics_when_asked(self, metrics: Metrics) -> None:
        """A scraper that accepts OpenMetrics gets OpenMetrics."""
        _, content_type, body = _get(
            _serve(metrics), "/metrics", accept="application/openmetrics-text; version=1.0.0"
        )
        assert content_type.startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")

    def test_healthz_ok_when_healthy(self, metrics: Metrics) -> None:
        """GET /healthz is 200 "ok" while healthy() is true."""
        assert _get(_serve(metrics, healthy=True), "/healthz")[::2] == (200, "ok\n")

    def test_healthz_503_when_unhealthy(self, metrics: Metrics) -> None:
        """GET /healthz is 503 while healthy() is false."""
        assert _get(_serve(metrics, healthy=False), "/healthz")[0] == 503

    def test_healthz_asks_on_every_request(self, metrics: Metrics) -> None:
        """Health follows healthy() at request time, not at serve() time."""
        state = {"healthy": True}
        metrics.serve("127.0.0.1:0", lambda: state["healthy"])
        assert metrics.port is not None
        assert _get(metrics.port, "/healthz")[0] == 200
        state["healthy"] = False
        assert _get(metrics.port, "/healthz")[0] == 503

    def test_healthz_503_when_probe_raises(self, metrics: Metrics) -> None:
        """A health probe that raises reads as unhealthy, still with an answer."""

        def broken() -> bool:
            raise OSError("heartbeat unreadable")

        metrics.serve("127.0.0.1:0", broken)
        assert metrics.port is not None
        assert _get(metrics.port, "/healthz")[0] == 503

    def test_serves_ipv6_loopback(self, metrics: Metrics) -> None:
        """A bracketed IPv6 host ("[::1]:port") is served over IPv6."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
        metrics.serve("[::1]:0", lambda: True)
        assert metrics.port is not None
        assert _get(metrics.port, "/healthz", host="[::1]")[0] == 200

    def test_unknown_path_is_404(self, metrics: Metrics) -> None:
        """Paths other than /metrics and /healthz are not found."""
        assert _get(_serve(metrics), "/")[0] == 404

    def test_port_is_none_until_serving(self, metrics: Metrics) -> None:
        """port tells whether and where the endpoint is served."""
        assert metrics.port is None
        assert _serve(metrics) > 0

    def test_serving_twice_is_refused(self, metrics: Metrics) -> None:
        """A second serve() while serving raises instead of leaking a server."""
        _serve(metrics)
        with pytest.raises(RuntimeError, match="already serving"):
            metrics.serve("127.0.0.1:0", lambda: True)

    def test_busy_port_raises_oserror(self, metrics: Metrics) -> None:
        """An address that is taken raises OSError for the service to report."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(OSError, match="in use"):
                metrics.serve(f"127.0.0.1:{taken.getsockname()[1]}", lambda: True)
        assert metrics.port is None


class TestClose:
    def test_close_releases_the_port(self) -> None:
        """After close() nothing listens on the port any more."""
        metrics = Metrics()
        port = _serve(metrics)
        metrics.close()
        assert metrics.port is None
        with pytest.raises(urllib.error.URLError):
            _get(port, "/healthz")

    def test_close_is_idempotent(self) -> None:
        """close() twice, or without serve(), is harmless."""
        never_served = Metrics()
        never_served.close()
        metrics = Metrics()
        _serve(metrics)
        metrics.close()
        metrics.close()
        assert metrics.port is None

    def test_serves_again_after_close(self) -> None:
        """A closed Metrics can serve again (the service restarts its endpoint)."""
        metrics = Metrics()
        _serve(metrics)
        metrics.close()
        try:
            assert _get(_serve(metrics), "/healthz")[0] == 200
        finally:
            metrics.close()


class TestPages:
    def test_pages_answer_their_paths(self, metrics: Metrics) -> None:
        """A path the `pages` callable answers is served with its status and type."""

        def pages(path: str) -> tuple[HTTPStatus, bytes, str] | None:
            return (HTTPStatus.OK, b"<p>hi</p>", "text/html") if path == "/" else None

        metrics.serve("127.0.0.1:0", lambda: True, pages)
        assert metrics.port is not None
        assert _get(metrics.port, "/?refresh=1") == (200, "text/html", "<p>hi</p>")
        assert _get(metrics.port, "/other")[0] == 404
        assert _get(metrics.port, "/healthz")[0] == 200

    def test_replies_say_not_to_sniff_their_type(self, metrics: Metrics) -> None:
        """Every reply carries `X-Content-Type-Options: nosniff`."""
        with _OPENER.open(f"http://127.0.0.1:{_serve(metrics)}/healthz", timeout=10) as response:
            assert response.headers["X-Content-Type-Options"] == "nosniff"

    def test_only_get_is_answered(self, metrics: Metrics) -> None:
        """POST, PUT and DELETE are refused (501): the server is read-only."""
        port = _serve(metrics)
        for method in ("POST", "PUT", "DELETE"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", b"x", method=method)
            with pytest.raises(urllib.error.HTTPError) as raised:
                _OPENER.open(request, timeout=10)
            raised.value.close()
            assert raised.value.code == 501
