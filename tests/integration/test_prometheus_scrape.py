"""A real Prometheus scraping a real HTTP exposition of InferenceMetrics, with the deployed alerting rules.

What the service records must come out of PromQL with the exact values, and the alerts in
deploy/monitoring/alerts.yml must match the labels the exposition really has (they go pending on real series).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inference_service.metrics import VERDICT_KNOWN, VERDICT_UNKNOWN, InferenceMetrics
from prometheus_client import start_http_server
from tests.integration.prometheus_harness import find_prometheus, running_prometheus
from visiontune.devstack.ports import free_port

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
JOB = "visiontune-inference"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        find_prometheus() is None, reason="no prometheus binary (Debian's `prometheus` package; `make prometheus`)"
    ),
]


@pytest.fixture
def metrics() -> InferenceMetrics:
    return InferenceMetrics(rate_window=100)


@pytest.fixture
def endpoint(metrics: InferenceMetrics) -> Iterator[str]:
    """`metrics.registry` served over HTTP on a loopback port (as the service does); host:port."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def values(result: list[dict[str, Any]]) -> dict[str, float]:
    """{metric name: value} of an instant-query result."""
    return {sample["metric"]["__name__"]: float(sample["value"][1]) for sample in result}


def test_unknown_false_positives_scraped_with_exact_values(
    metrics: InferenceMetrics, endpoint: str, tmp_path: Path
) -> None:
    model, version = "flowers", "v2"
    rates = []
    for accepted in (True, True, True, False):
        rates.append(metrics.record_unknown_feedback(model, version, accepted=accepted))
        if accepted:
            metrics.false_positives.labels(model, version).inc()
    assert rates == [1.0, 1.0, 1.0, 0.75]

    selector = f'{{model="{model}", version="{version}"}}'
    fp_total = f"visiontune_inference_unknown_false_positives_total{selector}"
    fp_rate = f"visiontune_inference_unknown_false_positive_rate{selector}"
    all_three = (
        '{__name__=~"visiontune_inference_unknown_(false_positives_total|false_positive_rate'
        f'|feedback_window)", model="{model}", version="{version}"}}'
    )

    with running_prometheus([endpoint], tmp_path / "prometheus") as prom:
        up = prom.wait_for(f'up{{job="{JOB}"}}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
        assert up[0]["metric"] == {"__name__": "up", "job": JOB, "instance": endpoint}

        [total] = prom.wait_for(fp_total, lambda r: len(r) == 1)
        assert total["metric"] == {
            "__name__": "visiontune_inference_unknown_false_positives_total",
            "job": JOB,
            "instance": endpoint,
            "model": model,
            "version": version,
        }
        assert float(total["value"][1]) == 3.0
        [rate] = prom.query(fp_rate)
        assert float(rate["value"][1]) == 0.75
        assert values(prom.query(all_three)) == {
            "visiontune_inference_unknown_false_positives_total": 3.0,
            "visiontune_inference_unknown_false_positive_rate": 0.75,
            "visiontune_inference_unknown_feedback_window": 4.0,
        }

        # One more false positive and five true rejections: 4 of 10.
        assert metrics.record_unknown_feedback(model, version, accepted=True) == 0.8
        metrics.false_positives.labels(model, version).inc()
        for _ in range(5):
            metrics.record_unknown_feedback(model, version, accepted=False)

        expected = {
            "visiontune_inference_unknown_false_positives_total": 4.0,
            "visiontune_inference_unknown_false_positive_rate": 0.4,
            "visiontune_inference_unknown_feedback_window": 10.0,
        }
        result = prom.wait_for(all_three, lambda r: values(r) == expected)
        assert values(result) == expected
        assert float(prom.query(fp_rate)[0]["value"][1]) == 0.4
        # The counter went up by exactly one between the two states Prometheus scraped.
        assert float(prom.query(f"max_over_time({fp_total}[5m]) - min_over_time({fp_total}[5m])")[0]["value"][1]) == 1.0

        # The harness's failure report names the query, the last result and the targets' health.
        with pytest.raises(AssertionError, match=r"(?s)did not satisfy.*last result.*\"health\": \"up\""):
            prom.wait_for(fp_total, lambda r: False, timeout=0.5)


def populate_baseline(metrics: InferenceMetrics) -> None:
    """Every series the service has, at values that page nothing on their own (counters at 0 where the alert
    needs them to grow while Prometheus watches)."""
    for model, version in (("flowers", "v2"), ("cats", "v1")):
        for code in ("OK", "UNAVAILABLE", "INVALID_ARGUMENT"):
            metrics.requests.labels(model, version, code)
        for outcome in ("correct", "misclassified", "false_rejection", "false_positive", "true_rejection"):
            metrics.feedback.labels(model, version, outcome)
        metrics.false_rejections.labels(model, version)
        metrics.false_positives.labels(model, version)
        metrics.unrecorded_requests.labels(model, version)
        metrics.images.labels(model, version)
        for verdict in (VERDICT_KNOWN, VERDICT_UNKNOWN):
            metrics.predictions.labels(model, version, verdict)
        for histogram in (metrics.request_seconds, metrics.preprocess_seconds, metrics.triton_seconds):
            histogram.labels(model, version)
    # dogs/v1 serves; once it is gone, the service counts dogs's calls under version="" as NOT_FOUND.
    metrics.requests.labels("dogs", "v1", "OK")
    metrics.requests.labels("dogs", "", "NOT_FOUND")
    metrics.set_deployments({("flowers", "v2"): 90, ("cats", "v1"): 10, ("dogs", "v1"): 100, ("birds", "v1"): 100})
    # cats/v1's rolling rate (this replica's view): 0.6 over 5 reports.
    for accepted in (True, True, True, False, False):
        metrics.record_unknown_feedback("cats", "v1", accepted=accepted)


def serve_traffic(metrics: InferenceMetrics) -> None:
    """flowers/v2 turns bad in every way; cats/v1 stays healthy; dogs loses its only version while clients keep
    calling it; birds is undeployed and nobody calls it (must not page)."""
    m, v = "flowers", "v2"
    metrics.requests.labels(m, v, "OK").inc(20)
    metrics.requests.labels(m, v, "UNAVAILABLE").inc(20)
    metrics.requests.labels(m, v, "INVALID_ARGUMENT").inc(5)
    metrics.images.labels(m, v).inc(40)
    metrics.predictions.labels(m, v, VERDICT_KNOWN).inc(30)
    metrics.predictions.labels(m, v, VERDICT_UNKNOWN).inc(10)
    for _ in range(20):
        metrics.request_seconds.labels(m, v).observe(0.4)
        metrics.preprocess_seconds.labels(m, v).observe(0.02)
        metrics.triton_seconds.labels(m, v).observe(0.35)
    for _ in range(15):
        metrics.feedback.labels(m, v, "false_rejection").inc()
        metrics.false_rejections.labels(m, v).inc()
        metrics.feedback.labels(m, v, "correct").inc()
    for accepted in [True] * 25 + [False] * 25:
        metrics.record_unknown_feedback(m, v, accepted=accepted)
        metrics.feedback.labels(m, v, "false_positive" if accepted else "true_rejection").inc()
        if accepted:
            metrics.false_positives.labels(m, v).inc()

    # cats/v1: 3 false positives in 5 unknown-class reports, too few to page.
    for accepted in (True, True, True, False, False):
        metrics.feedback.labels("cats", "v1", "false_positive" if accepted else "true_rejection").inc()
        if accepted:
            metrics.false_positives.labels("cats", "v1").inc()

    metrics.requests.labels("cats", "v1", "OK").inc(50)
    for _ in range(50):
        metrics.request_seconds.labels("cats", "v1").observe(0.01)
    metrics.set_deployments({("flowers", "v2"): 90, ("cats", "v1"): 10}, {"flowers", "cats"})
    for model in ("dogs", "birds"):
        metrics.forget_version(model, "v1")
    metrics.requests.labels("dogs", "", "NOT_FOUND").inc(30)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the dashboard's variables filled in) for every inference-service query."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "visiontune_inference_" not in expr:
                continue  # Triton's nv_* series: no Triton here
            expr = re.sub(r"\$(model|version)\b", ".*", expr).replace("$__rate_interval", "1m")
            assert "$" not in expr, f"unfilled dashboard variable in {expr!r}"
            queries.append((panel["title"], expr))
    return queries


def alert_keys(result: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(alertname, model, instance) of an ALERTS query's series."""
    return {(s["metric"]["alertname"], s["metric"].get("model", ""), s["metric"].get("instance", "")) for s in result}


def test_alert_rules_and_dashboard_on_real_series(metrics: InferenceMetrics, endpoint: str, tmp_path: Path) -> None:
    populate_baseline(metrics)
    dead = f"127.0.0.1:{free_port()}"  # a replica that does not answer
    with running_prometheus([endpoint, dead], tmp_path / "prometheus", rule_files=[MONITORING / "alerts.yml"]) as prom:
        prom.wait_for(
            f'visiontune_inference_deployed_versions{{model="dogs", instance="{endpoint}"}}',
            lambda r: len(r) == 1 and r[0]["value"][1] == "1",
        )
        # Two scrapes of the baseline, so rates start from it.
        prom.wait_for(f'count_over_time(up{{instance="{endpoint}"}}[5m])', lambda r: float(r[0]["value"][1]) >= 2)
        serve_traffic(metrics)

        expected = {
            ("VisionTuneInferenceTargetDown", "", dead),
            ("VisionTuneModelNoLiveVersions", "dogs", endpoint),
            ("VisionTuneInferenceHighErrorRatio", "flowers", ""),
            ("VisionTuneInferenceHighLatencyP99", "flowers", ""),
            ("VisionTuneUnknownFalsePositiveRateHigh", "flowers", ""),
            ("VisionTuneFalseRejectionsHigh", "flowers", ""),
        }
        alerts = prom.wait_for("ALERTS", lambda r: alert_keys(r) == expected, timeout=60)
        assert {(s["metric"]["alertname"], s["metric"]["alertstate"]) for s in alerts} == {
            (name, "pending") for name, _, _ in expected
        }
        assert all(s["metric"].get("version") in (None, "v2") for s in alerts)

        # dogs and birds keep their live-version count, at 0; only dogs, which clients still call, pages.
        deployed = {
            s["metric"]["model"]: float(s["value"][1])
            for s in prom.query(f'visiontune_inference_deployed_versions{{instance="{endpoint}"}}')
        }
        assert deployed == {"flowers": 1.0, "cats": 1.0, "dogs": 0.0, "birds": 0.0}
        assert alert_keys(prom.query('ALERTS{alertname="VisionTuneModelNoLiveVersions"}')) == {
            ("VisionTuneModelNoLiveVersions", "dogs", endpoint)
        }

        # Every rule evaluates without error on the real series.
        groups = prom.rule_groups()
        assert {g["name"] for g in groups} == {"visiontune-inference", "visiontune-inference-recording"}
        bad = [(r["name"], r["health"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert bad == []

        # The recorded p99 of flowers/v2: all 20 requests at 0.4 s fall in the (0.25, 0.5] bucket. The recording
        # group is evaluated apart from the alerts: its last sample may still be from before the traffic (NaN).
        [p99] = prom.wait_for(
            'model_version:visiontune_inference_request_duration_seconds:p99_rate5m{model="flowers"}',
            lambda r: len(r) == 1 and 0.25 < float(r[0]["value"][1]) <= 0.5,
            timeout=20,
        )
        assert 0.25 < float(p99["value"][1]) <= 0.5

        # Every dashboard query parses and finds data.
        for title, expr in dashboard_queries():
            result = prom.wait_for(expr, lambda r: len(r) > 0, timeout=20)
            assert result, title
