"""The false-positive accounting, end to end: a real inference service (and Triton) scraped by a real Prometheus.

Known-class and unknown-class images are classified; feedback says which were which; the unknown-class
false-positive counter, the false-rejection counter and the rolling false-positive rate must read exactly
what the feedback implies, through PromQL. Then more feedback moves them again, exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.integration.inference_helpers import (
    GREEN,
    GREY,
    RED,
    Inference,
    publish_color_model,
    solid_image,
    start_inference,
)
from tests.integration.prometheus_harness import find_prometheus, running_prometheus
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(find_prometheus() is None, reason="no prometheus binary (`make prometheus` installs it)"),
]

SELECTOR = '{model="watched",version="v1"}'


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _report(service: Inference, request_id: str, index: int, **truth: object) -> int:
    outcome: int = service.stub.ReportFeedback(
        pb.ReportFeedbackRequest(request_id=request_id, index=index, **truth), timeout=10
    ).outcome
    return outcome


def test_false_positive_counters_and_rate_follow_the_feedback_through_prometheus(
    store: ArtifactStore, s3_server: S3ServerProcess, tmp_path: Path
) -> None:
    service = start_inference(store, s3_server, tmp_path / "inference", "--fp-rate-window", "4")
    try:
        service.deploy(publish_color_model(store, "watched"))
        with running_prometheus([f"127.0.0.1:{service.process.metrics_port}"], tmp_path / "prometheus") as prom:
            # Unknown-class images: grey. Accepted as known at a lenient threshold (false positives),
            # rejected at the manifest's (true rejections).
            lenient = service.classify(
                "models/watched", solid_image(GREY), solid_image(GREY), solid_image(GREY), unknown_threshold=0.2
            )
            strict = service.classify("models/watched", solid_image(GREY))
            # Known-class images: red and green, one rejected by an impossible threshold (a false rejection).
            known = service.classify("models/watched", solid_image(RED), solid_image(GREEN))
            dull_red = solid_image((200, 80, 80))  # "red" at p ~ 0.9998: below a threshold of 1
            rejected = service.classify("models/watched", dull_red, unknown_threshold=1.0)
            assert [c.unknown for c in lenient.classifications] == [False, False, False]
            assert strict.classifications[0].unknown
            assert rejected.classifications[0].unknown

            for i in range(3):
                assert _report(service, lenient.request_id, i, unknown=True) == pb.FEEDBACK_OUTCOME_FALSE_POSITIVE
            assert _report(service, strict.request_id, 0, unknown=True) == pb.FEEDBACK_OUTCOME_TRUE_REJECTION
            assert _report(service, known.request_id, 0, true_label="red") == pb.FEEDBACK_OUTCOME_CORRECT
            assert _report(service, known.request_id, 1, true_label="red") == pb.FEEDBACK_OUTCOME_MISCLASSIFIED
            assert _report(service, rejected.request_id, 0, true_label="red") == pb.FEEDBACK_OUTCOME_FALSE_REJECTION
            _report(service, lenient.request_id, 0, unknown=True)  # a repeat: not counted again

            fp = f"visiontune_inference_unknown_false_positives_total{SELECTOR}"
            assert _value(prom.wait_for(fp, lambda r: _value(r) == 3.0)) == 3.0
            rate = f"visiontune_inference_unknown_false_positive_rate{SELECTOR}"
            assert _value(prom.wait_for(rate, lambda r: _value(r) == 0.75)) == 0.75
            fr = f"visiontune_inference_false_rejections_total{SELECTOR}"
            assert _value(prom.wait_for(fr, lambda r: _value(r) == 1.0)) == 1.0
            outcomes = prom.wait_for(f"visiontune_inference_feedback_total{SELECTOR}", lambda r: len(r) == 5)
            assert {r["metric"]["outcome"]: float(r["value"][1]) for r in outcomes} == {
                "false_positive": 3.0,
                "true_rejection": 1.0,
                "correct": 1.0,
                "misclassified": 1.0,
                "false_rejection": 1.0,
            }
            verdicts = prom.wait_for(f"visiontune_inference_predictions_total{SELECTOR}", lambda r: len(r) == 2)
            assert {r["metric"]["verdict"]: float(r["value"][1]) for r in verdicts} == {"known": 5.0, "unknown": 2.0}

            # Two more unknown-class images, both rejected. Reports so far: FP FP FP TR TR TR; the window of
            # the last 4 holds FP TR TR TR.
            more = service.classify("models/watched", *(solid_image(GREY) for _ in range(2)))
            for i in range(2):
                assert _report(service, more.request_id, i, unknown=True) == pb.FEEDBACK_OUTCOME_TRUE_REJECTION
            assert _value(prom.wait_for(rate, lambda r: _value(r) == 0.25)) == 0.25
            assert _value(prom.query(fp)) == 3.0  # the counter does not move on true rejections

            latency = (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(visiontune_inference_request_duration_seconds_bucket{SELECTOR}[1m])))"
            )
            p99 = prom.wait_for(latency, lambda r: _value(r) is not None and _value(r) > 0)
            assert 0 < (_value(p99) or 0) < 10
            live = prom.wait_for('visiontune_inference_deployed_versions{model="watched"}', lambda r: _value(r) == 1)
            assert _value(live) == 1.0
    finally:
        service.stop()
