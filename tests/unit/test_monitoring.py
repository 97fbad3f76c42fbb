"""deploy/monitoring: promtool accepts the rules, their unit tests, the config and the service's exposition;
the alerts and the dashboard query only series that InferenceMetrics (or Triton) really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from inference_service.metrics import PREFIX, VERDICT_KNOWN, VERDICT_UNKNOWN, InferenceMetrics
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

SEVERITIES = {"critical", "warning"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Labels of Triton's nv_* series.
TRITON_LABELS = {"model", "version", "gpu_uuid"}

PROMQL_FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip("promtool is not installed (Debian's `prometheus` package: `make prometheus`)")
    return path


def run_promtool(promtool: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=MONITORING,
        check=False,
    )


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(proc.args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# --- promtool ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("check", "rules", str(ALERTS)), id="check-rules"),
        pytest.param(("test", "rules", str(ALERTS_TEST)), id="test-rules"),
        pytest.param(("check", "config", str(CONFIG)), id="check-config"),
    ],
)
def test_promtool_accepts(promtool: str, args: tuple[str, ...]) -> None:
    proc = run_promtool(promtool, *args)
    assert proc.returncode == 0, show(proc)
    assert "SUCCESS" in proc.stdout, show(proc)


def populated_metrics() -> InferenceMetrics:
    """An InferenceMetrics with samples in every series."""
    metrics = InferenceMetrics(rate_window=10)
    model, version = "flowers", "v2"
    for histogram in (metrics.request_seconds, metrics.preprocess_seconds, metrics.triton_seconds):
        histogram.labels(model, version).observe(0.012)
    metrics.requests.labels(model, version, "OK").inc(3)
    metrics.requests.labels(model, version, "INVALID_ARGUMENT").inc()
    metrics.images.labels(model, version).inc(5)
    metrics.predictions.labels(model, version, VERDICT_KNOWN).inc(4)
    metrics.predictions.labels(model, version, VERDICT_UNKNOWN).inc()
    for outcome in ("correct", "misclassified", "false_rejection", "false_positive", "true_rejection"):
        metrics.feedback.labels(model, version, outcome).inc()
    metrics.false_positives.labels(model, version).inc()
    metrics.false_rejections.labels(model, version).inc()
    metrics.unrecorded_requests.labels(model, version).inc()
    metrics.record_unknown_feedback(model, version, accepted=True)
    metrics.record_unknown_feedback(model, version, accepted=False)
    metrics.set_deployments({(model, version): 90, (model, "v1"): 10})
    return metrics


def test_promtool_check_metrics_accepts_the_exposition(promtool: str) -> None:
    exposition = populated_metrics().exposition()
    proc = run_promtool(promtool, "check", "metrics", stdin=exposition)
    assert proc.returncode == 0, show(proc)
    assert proc.stdout.strip() == "", show(proc)
    assert proc.stderr.strip() == "", show(proc)


# --- which series exist ----------------------------------------------------------------------------------------


def exported_series() -> dict[str, set[str]]:
    """{queryable series name: its label names} of InferenceMetrics: a histogram X gives X_bucket (with `le`),
    X_sum, X_count; a counter X gives X_total; a gauge X gives X."""
    series: dict[str, set[str]] = {}
    families = list(populated_metrics().registry.collect())
    assert families, "InferenceMetrics registered nothing"
    for family in families:
        assert family.samples, f"{family.name}: no samples (populated_metrics() misses it)"
        labels = {name for sample in family.samples for name in sample.labels if name != "le"}
        if family.type == "histogram":
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_sum"] = labels
            series[f"{family.name}_count"] = labels
        elif family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "gauge":
            series[family.name] = labels
        else:
            pytest.fail(f"{family.name}: unexpected metric type {family.type}")
    assert all(name.startswith(PREFIX + "_") for name in series), sorted(series)
    return series


def test_exported_series_are_the_documented_ones() -> None:
    series = exported_series()
    assert series[f"{PREFIX}_requests_total"] == {"model", "version", "code"}
    assert series[f"{PREFIX}_request_duration_seconds_bucket"] == {"model", "version", "le"}
    assert series[f"{PREFIX}_deployed_versions"] == {"model"}
    assert len(series) == 3 * 3 + 7 + 4  # 3 histograms, 7 counters, 4 gauges


# --- a small PromQL reader: which series and labels an expression uses --------------------------------------


@dataclass
class PromqlRefs:
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric name, matcher label names)
    grouping_labels: set[str] = field(default_factory=set)  # by / without / on / ignoring / group_x labels
    functions: set[str] = field(default_factory=set)


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
    """,
    re.VERBOSE,
)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 30]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, match.group()))
        pos = match.end()
    return tokens


def promql_refs(expr: str) -> PromqlRefs:
    """The series, matcher labels, grouping labels and functions an expression uses. Grafana's duration
    variables must be substituted, other `$variables` may only appear inside label-matcher strings."""
    for variable, value in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, value)
    tokens = tokenize(expr)
    refs = PromqlRefs()
    i = 0

    def label_list(start: int) -> int:
        """Read `( a, b )` at tokens[start]; return the index after it."""
        assert tokens[start] == ("op", "("), f"expected a label list in {expr!r}"
        j = start + 1
        while tokens[j] != ("op", ")"):
            kind, text = tokens[j]
            if kind == "ident":
                refs.grouping_labels.add(text)
            elif text != ",":
                raise ValueError(f"unexpected {text!r} in a label list of {expr!r}")
            j += 1
        return j + 1

    def matchers(start: int) -> tuple[int, set[str]]:
        """Read `{ l op "v", ... }` at tokens[start]; return the index after it and the label names."""
        names = set()
        j = start + 1
        while tokens[j] != ("op", "}"):
            kind, text = tokens[j]
            if kind == "ident":
                _, op = tokens[j + 1]
                value_kind, _ = tokens[j + 2]
                if op not in ("=", "!=", "=~", "!~") or value_kind != "string":
                    raise ValueError(f"bad label matcher {text}{op}... in {expr!r}")
                names.add(text)
                j += 3
            elif text == ",":
                j += 1
            else:
                raise ValueError(f"unexpected {text!r} in label matchers of {expr!r}")
        return j + 1, names

    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            i = label_list(i + 1) if following == ("op", "(") else i + 1
        elif kind == "ident" and (text in AGGREGATIONS or text in KEYWORDS):
            i += 1
        elif kind == "ident" and following == ("op", "("):
            refs.functions.add(text)
            i += 1
        elif kind == "ident":
            if following == ("op", "{"):
                i, names = matchers(i + 1)
            else:
                i, names = i + 1, set()
            refs.selectors.append((text, names))
        elif (kind, text) == ("op", "{"):
            raise ValueError(f"a selector without a metric name in {expr!r}")
        elif "$" in text:  # label-matcher strings were read above
            raise ValueError(f"a variable outside a label matcher: {text!r} in {expr!r}")
        else:
            i += 1
    return refs


@pytest.mark.parametrize(
    ("expr", "selectors", "grouping", "functions"),
    [
        (
            'sum by (le) (rate(x_bucket{a="}{", b=~"$model"}[$__rate_interval]))',
            [("x_bucket", {"a", "b"})],
            {"le"},
            {"rate"},
        ),
        (
            "a / ignoring (v) group_left sum(b) > bool 0.5 and on (m) c offset 5m",
            [("a", set()), ("b", set()), ("c", set())],
            {"v", "m"},
            set(),
        ),
        (
            "histogram_quantile(0.99, sum without (instance) (rate(h_bucket[5m]))) > 2.5e-1",
            [("h_bucket", set())],
            {"instance"},
            {"histogram_quantile", "rate"},
        ),
    ],
)
def test_promql_reader(
    expr: str, selectors: list[tuple[str, set[str]]], grouping: set[str], functions: set[str]
) -> None:
    refs = promql_refs(expr)
    assert refs.selectors == selectors
    assert refs.grouping_labels == grouping
    assert refs.functions == functions


@pytest.mark.parametrize(
    "expr", ['{__name__="x"}', "rate(x[$__unknown])", 'x{a=="b"}', "x $model", 'label_replace(x, "$v", "", "", "")']
)
def test_promql_reader_rejects(expr: str) -> None:
    with pytest.raises(ValueError, match=r"PromQL|label|variable|selector"):
        promql_refs(expr)


# --- alerts.yml and the dashboard against the exported series ------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule | {"group": group["name"]} for group in doc["groups"] for rule in group["rules"]]


def recorded_series() -> dict[str, set[str]]:
    """Recording rules' outputs; their labels are what they aggregate by."""
    recorded = {}
    for rule in load_rules():
        if "record" in rule:
            refs = promql_refs(rule["expr"])
            recorded[rule["record"]] = refs.grouping_labels - {"le"}
    return recorded


def dashboard_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard_doc()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard_panels() for target in panel.get("targets", [])]


def unknown_references(expr: str, *, allowed_extra: dict[str, set[str]]) -> list[str]:
    """Problems with the series, labels and functions `expr` uses (empty when all exist)."""
    series = exported_series() | allowed_extra
    all_labels = set().union(*series.values()) | TARGET_LABELS | TRITON_LABELS | {"le"}
    refs = promql_refs(expr)
    problems = [f"unknown function {name}()" for name in sorted(refs.functions - PROMQL_FUNCTIONS)]
    problems += [f"unknown label {label!r} in by/on/without" for label in sorted(refs.grouping_labels - all_labels)]
    for name, labels in refs.selectors:
        if name.startswith("nv_"):
            continue  # Triton's own series
        if name not in series:
            problems.append(f"series {name} is not exported by InferenceMetrics")
        elif unknown := labels - series[name] - TARGET_LABELS:
            problems.append(f"{name} has no label(s) {sorted(unknown)}")
    if not refs.selectors:
        problems.append("no series at all")
    return problems


def test_reference_check_catches_mistakes() -> None:
    assert unknown_references(f'rate({PREFIX}_requests_total{{code="OK"}}[5m])', allowed_extra={}) == []
    assert unknown_references(f"rate({PREFIX}_requests[5m])", allowed_extra={}) == [
        f"series {PREFIX}_requests is not exported by InferenceMetrics"
    ]
    assert unknown_references(f'{PREFIX}_deployed_versions{{version="v1"}}', allowed_extra={}) == [
        f"{PREFIX}_deployed_versions has no label(s) ['version']"
    ]
    assert unknown_references(f"sum by (modle) (rat({PREFIX}_images_total[5m]))", allowed_extra={}) == [
        "unknown function rat()",
        "unknown label 'modle' in by/on/without",
    ]


def test_rules_reference_only_exported_series() -> None:
    rules = load_rules()
    assert rules
    extra = recorded_series() | {"up": set()}
    problems = {
        rule.get("alert") or rule["record"]: unknown_references(rule["expr"], allowed_extra=extra) for rule in rules
    }
    assert {name: found for name, found in problems.items() if found} == {}


def test_dashboard_references_only_exported_series() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    problems = {f"{title}: {expr}": unknown_references(expr, allowed_extra=recorded_series()) for title, expr in exprs}
    assert {key: found for key, found in problems.items() if found} == {}


# --- alerts.yml conventions -----------------------------------------------------------------------------------


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def test_alerts_are_actionable() -> None:
    rules = alerts()
    assert {rule["group"] for rule in rules} == {"visiontune-inference"}
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert len(annotations["description"]) > 100, name
        if "model" in promql_refs(rule["expr"]).grouping_labels:
            for text in (annotations["summary"], annotations["description"]):
                assert "$labels.model" in text, f"{name}: annotation does not name the model"
                if "version" in promql_refs(rule["expr"]).grouping_labels:
                    assert "$labels.version" in text, f"{name}: annotation does not name the version"


def exposed_samples(metrics: InferenceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition, as a scrape reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def test_no_live_versions_alert_sees_what_the_service_exports() -> None:
    """VisionTuneModelNoLiveVersions joins a 0 live-version count with the model's request rate: the service keeps
    the count at 0 after the last version goes, and counts the calls it cannot serve under version=""."""
    [rule] = [rule for rule in alerts() if rule["alert"] == "VisionTuneModelNoLiveVersions"]
    refs = promql_refs(rule["expr"])
    assert {name for name, _ in refs.selectors} == {f"{PREFIX}_requests_total", f"{PREFIX}_deployed_versions"}
    assert refs.grouping_labels == {"job", "instance", "model"}
    assert refs.functions == {"rate"}  # no max_over_time / absent workaround for vanished series

    metrics = InferenceMetrics()
    metrics.set_deployments({("flowers", "v1"): 100, ("cats", "v1"): 100})
    metrics.set_deployments({("cats", "v1"): 100}, {"cats"})
    metrics.forget_version("flowers", "v1")
    metrics.requests.labels("flowers", "", "NOT_FOUND").inc()
    samples = exposed_samples(metrics)
    assert samples[(f"{PREFIX}_deployed_versions", (("model", "flowers"),))] == 0.0
    assert samples[(f"{PREFIX}_deployed_versions", (("model", "cats"),))] == 1.0
    assert samples[(f"{PREFIX}_requests_total", (("code", "NOT_FOUND"), ("model", "flowers"), ("version", "")))] == 1.0


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    names = {rule["alert"] for rule in alerts()}
    doc = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == names, f"alerts without a test that fires them: {sorted(names - fires)}"
    assert quiet == names, f"alerts without a test that they stay quiet: {sorted(names - quiet)}"


# --- the dashboard --------------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    doc = dashboard_doc()
    assert 36 <= doc["schemaVersion"] <= 41
    variables = {var["name"]: var for var in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    series = exported_series()
    for name in ("model", "version"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == "${datasource}"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", query)
        assert match, f"${name}: {query!r} is not label_values(series, label)"
        assert match.group(1) in series, query
        assert match.group(3) == name, query
        assert name in series[match.group(1)], query

    panels = list(dashboard_panels())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    used = {m for _, expr in dashboard_exprs() for m in re.findall(r"\$(\w+)", expr)}
    assert used - {"__rate_interval", "__interval", "__range"} <= set(variables)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]

    titles = {panel["title"] for panel in panels}
    for required in (
        "Requests by code",
        "Classify latency (end to end)",
        "Preprocess vs Triton latency (p99)",
        "Predictions by verdict",
        "Unknown-class false-positive rate",
        "False positives and false rejections per hour",
        "Feedback by outcome",
        "Deployed versions",
        "Traffic weights",
    ):
        assert required in titles


def threshold_of(alert: str) -> float:
    """The `> x` threshold that ends the first comparison of an alert's expression."""
    [rule] = [rule for rule in alerts() if rule["alert"] == alert]
    match = re.search(r"\)\s*>\s*([0-9.]+)", rule["expr"])
    assert match, f"{alert}: no `) > threshold` in its expression"
    return float(match.group(1))


@pytest.mark.parametrize(
    ("title", "alert"),
    [
        ("Unknown-class false-positive rate", "VisionTuneUnknownFalsePositiveRateHigh"),
        ("Classify latency (end to end)", "VisionTuneInferenceHighLatencyP99"),
        ("Server error ratio", "VisionTuneInferenceHighErrorRatio"),
    ],
)
def test_dashboard_thresholds_match_the_alerts(title: str, alert: str) -> None:
    [panel] = [panel for panel in dashboard_panels() if panel["title"] == title]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    red = [step["value"] for step in steps if step["color"] == "red"]
    assert red == [threshold_of(alert)]
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
