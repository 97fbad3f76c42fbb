"""`visiontune deploy`, `undeploy`, `deployments`, `classify`, `feedback`, `metrics`: the inference service.

`deploy models/M` picks M's newest committed version from the bucket; `classify` sends images in requests
the service accepts (at most 64 images and 48 MiB each) and prints the open-set verdict of every image with
the request id that `feedback` refers to.

Several inference replicas (the local stack's `--inference-replicas`, or VISIONTUNE_INFERENCE=a:p,b:p): classify
and feedback go to them round-robin through one channel (they share the prediction store, so a report may reach
any replica). A deployment is each replica's own (its Triton), so `deploy` and `undeploy` go to every replica in
turn, `deployments` lists each one's, and `metrics` shows each replica's samples.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
import grpc
from google.protobuf import duration_pb2

from visiontune import names
from visiontune.cli.common import (
    cli,
    count,
    data_dir_option,
    enum_word,
    inference,
    inference_targets,
    rpc_failed,
    s3_settings,
    stack_state,
)
from visiontune.devstack import stack
from visiontune.imagefolder import IMAGE_SUFFIXES, is_image_name
from visiontune.outages import NO_WAIT
from visiontune.store import MANIFEST, ArtifactStore, StoreError
from visiontune.v1 import inference_service_pb2 as inference_pb
from visiontune.v1 import inference_service_pb2_grpc

# Per Classify request: the service's image limit, and a byte budget under the 64 MiB message limit.
_CLASSIFY_MAX_IMAGES = 64
_CLASSIFY_MAX_BYTES = 48 * 1024 * 1024
_DEPLOY_OPTIONS = {
    "traffic_weight": "--weight",
    "max_batch_size": "--max-batch-size",
    "max_queue_delay": "--max-queue-delay-ms",
    "instance_count": "--instances",
}
_OUTCOMES = {
    inference_pb.FEEDBACK_OUTCOME_CORRECT: "correct (a known image, accepted with the right label)",
    inference_pb.FEEDBACK_OUTCOME_MISCLASSIFIED: "misclassified (a known image, accepted with the wrong label)",
    inference_pb.FEEDBACK_OUTCOME_FALSE_REJECTION: "false rejection (a known image rejected as unknown)",
    inference_pb.FEEDBACK_OUTCOME_FALSE_POSITIVE: "false positive (unknown class accepted as known)",
    inference_pb.FEEDBACK_OUTCOME_TRUE_REJECTION: "true rejection (an unknown image rejected as unknown)",
}
_METRIC_PREFIX = "visiontune_inference_"
_METRICS_ENV = "VISIONTUNE_INFERENCE_METRICS"


def inference_metrics_urls(data_dir: Path) -> list[tuple[str, str]]:
    """(replica, URL) of each inference replica's Prometheus endpoint: $VISIONTUNE_INFERENCE_METRICS (URLs,
    comma-separated), else the local stack's replicas."""
    value = os.environ.get(_METRICS_ENV)
    if value:
        urls = [url.strip() for url in value.split(",") if url.strip()]
        return [(urllib.parse.urlsplit(url).netloc or url, url) for url in urls]
    state = stack_state(data_dir, f"no metrics endpoint: set {_METRICS_ENV}=http://host:port/metrics")
    found = []
    for replica in state.replicas(stack.INFERENCE):
        url = replica.endpoints.get("metrics")
        if not url:
            raise click.ClickException(
                f"the stack under {state.data_dir} records no metrics endpoint; restart it "
                "(visiontune down && visiontune up)"
            )
        found.append((replica.name, url))
    return found


def _model_option_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`models/{m}` or `models/{m}/versions/{v}`, checked here so a typo is a usage error, not a round trip."""
    if value is None:
        return None
    try:
        if "/versions/" in value:
            names.parse_model_version_name(value)
        else:
            names.parse_model_name(value)
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err
    return value


def _version_argument_value(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return str(names.parse_model_version_name(value))
    except names.InvalidName as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


def _deployment_state(state: int) -> str:
    return enum_word(inference_pb.DeploymentState.DESCRIPTOR, state)


def _milliseconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e6


def _batching(d: inference_pb.Deployment) -> str:
    return (
        f"batch <= {d.max_batch_size}, queue delay {_milliseconds(d.max_queue_delay):g} ms, "
        f"{count(d.instance_count, 'instance')}"
    )


def _newest_version(data_dir: Path, model: str) -> tuple[str, list[str]]:
    """The model's newest committed version in the bucket (by its manifest's time), and all of them."""
    settings = s3_settings(data_dir)
    # A lookup before a command's real work: with S3 down, say so now rather than wait out an outage.
    store = ArtifactStore.connect(settings, outage=NO_WAIT)
    try:
        versions = store.list_model_versions(model)
        if not versions:
            raise click.ClickException(
                f"models/{model} has no committed version in s3://{settings.bucket} at "
                f"{settings.url}; train one first (its spec's output_model)"
            )
        # Versions are job IDs, which do not sort by time: the manifest, written last, says when each was committed.
        stamps = {v: store.stat(f"{names.ModelVersionName(model, v).prefix}{MANIFEST}").last_modified for v in versions}
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    epoch = datetime.min.replace(tzinfo=UTC)
    newest = max(versions, key=lambda v: (stamps[v] or epoch, v))
    return newest, versions


def _list_deployments(
    stub: inference_service_pb2_grpc.InferenceServiceStub, target: str, model: str = ""
) -> list[inference_pb.Deployment]:
    found: list[inference_pb.Deployment] = []
    token = ""
    while True:
        try:
            page = stub.ListDeployments(inference_pb.ListDeploymentsRequest(model=model, page_token=token), timeout=30)
        except grpc.RpcError as err:
            raise rpc_failed(target, err) from err
        found.extend(page.deployments)
        token = page.next_page_token
        if not token:
            return found


def _traffic_share(d: inference_pb.Deployment, deployments: Sequence[inference_pb.Deployment]) -> str:
    """The version's share of its model's traffic: its weight over the weights of the model's ready versions."""
    if d.state != inference_pb.DEPLOYMENT_STATE_READY:
        return "-"
    model = names.parse_model_version_name(d.model_version).model
    total = sum(
        o.traffic_weight
        for o in deployments
        if o.state == inference_pb.DEPLOYMENT_STATE_READY
        and names.parse_model_version_name(o.model_version).model == model
    )
    return f"{d.traffic_weight / total:.0%}" if total else "0%"


@cli.command()
@click.argument("model_version", metavar="MODEL_VERSION", callback=_model_option_value)
@click.option(
    "--weight",
    type=int,
    default=None,
    help="Traffic weight relative to the model's other live versions [default: the service's, 100].",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=None,
    help="Triton dynamic batching: largest batch [default: the service's, 32].",
)
@click.option(
    "--max-queue-delay-ms",
    type=float,
    default=None,
    help="Triton dynamic batching: how long a request may wait for others [default: the service's, 2].",
)
@click.option("--instances", type=int, default=None, help="Model instances in Triton [default: the service's, 1].")
@click.option(
    "--replace",
    is_flag=True,
    help="Once this version is live, undeploy the model's other versions (a blue/green switch).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the model to load.",
)
@data_dir_option
def deploy(
    model_version: str,
    weight: int | None,
    max_batch_size: int | None,
    max_queue_delay_ms: float | None,
    instances: int | None,
    replace: bool,
    timeout: float,
    data_dir: Path,
) -> None:
    """Deploy a model version into Triton.

    MODEL_VERSION is models/M/versions/V, or models/M for M's newest committed version. Deploying a live
    version again changes its weight and batching. Exit 2 for settings the service refuses.
    """
    if "/versions/" not in model_version:
        model = names.parse_model_name(model_version)
        version, versions = _newest_version(data_dir, model)
        which = f"the newest of its {len(versions)} committed versions" if len(versions) > 1 else "its only version"
        model_version = str(names.ModelVersionName(model, version))
        click.echo(f"models/{model}: picked {version}, {which}")
    request = inference_pb.DeployModelRequest(model_version=model_version)
    if weight is not None:
        request.traffic_weight = weight
    if max_batch_size is not None:
        request.max_batch_size = max_batch_size
    if max_queue_delay_ms is not None:
        request.max_queue_delay.FromNanoseconds(round(max_queue_delay_ms * 1e6))
    if instances is not None:
        request.instance_count = instances
    targets = inference_targets(data_dir)
    live: list[str] = []
    replaced: list[str] = []
    for target in targets:
        with inference(data_dir, target) as (_, stub):
            click.echo(f"deploying {model_version} on {target} ... (Triton loads the model)")
            started = time.monotonic()
            try:
                d = stub.DeployModel(request, timeout=timeout)
                took = time.monotonic() - started
                model = names.parse_model_version_name(d.model_version).model
                if replace:
                    for other in _list_deployments(stub, target, f"models/{model}"):
                        if other.model_version != d.model_version:
                            stub.UndeployModel(
                                inference_pb.UndeployModelRequest(model_version=other.model_version), timeout=timeout
                            )
                            if other.model_version not in replaced:
                                replaced.append(other.model_version)
            except grpc.RpcError as err:
                failed = rpc_failed(target, err, field_name=lambda f: _DEPLOY_OPTIONS.get(f, f))
                if live:
                    failed = type(failed)(
                        f"{failed.message}\n{model_version} is live on {', '.join(live)} only; run the same deploy "
                        f"again once {target} answers (a replica that restarts restores every deployment from the "
                        "bucket)"
                    )
                raise failed from err
            deployments = _list_deployments(stub, target, f"models/{model}")
        live.append(target)
        if len(targets) > 1:
            click.echo(f"  {_deployment_state(d.state)} in {took:.1f} s")
    if len(targets) == 1:
        click.echo(f"{d.model_version}: {_deployment_state(d.state)} in {took:.1f} s")
    else:
        click.echo(f"{d.model_version}: {_deployment_state(d.state)} on {count(len(targets), 'replica')}")
    click.echo(f"  triton model:   {d.triton_model}")
    click.echo(f"  device:         {d.device}")
    click.echo(f"  traffic weight: {d.traffic_weight} ({_traffic_share(d, deployments)} of models/{model}'s traffic)")
    click.echo(f"  batching:       {_batching(d)}")
    for name in replaced:
        click.echo(f"undeployed {name} (replaced)")
    click.echo(f"classify with: visiontune classify IMAGE... --model models/{model}")


@cli.command()
@click.argument("model_version", metavar="MODEL_VERSION", callback=_version_argument_value)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds to wait (in-flight requests finish first).",
)
@data_dir_option
def undeploy(model_version: str, timeout: float, data_dir: Path) -> None:
    """Stop serving a model version (MODEL_VERSION: models/M/versions/V) and unload it from Triton, on every
    inference replica."""
    targets = inference_targets(data_dir)
    absent: list[str] = []
    for target in targets:
        with inference(data_dir, target) as (_, stub):
            try:
                response = stub.UndeployModel(
                    inference_pb.UndeployModelRequest(model_version=model_version), timeout=timeout
                )
            except grpc.RpcError as err:
                # With several replicas, one that does not serve it (restarted after an undeploy elsewhere, or
                # never reached by the deploy) is not a failure; none serving it is.
                if len(targets) > 1 and err.code() == grpc.StatusCode.NOT_FOUND:
                    absent.append(target)
                    continue
                raise rpc_failed(target, err) from err
        d = response.deployment
        where = f" on {target}" if len(targets) > 1 else ""
        click.echo(
            f"undeployed {d.model_version}{where} (Triton model {d.triton_model}, was {_deployment_state(d.state)})"
        )
    if len(absent) == len(targets):
        raise click.ClickException(f"{model_version} is not deployed on any of {', '.join(targets)}")
    for target in absent:
        click.echo(f"{model_version} was not deployed on {target}")


@cli.command()
@click.option("--model", default=None, callback=_model_option_value, help="Only this model's versions (models/M).")
@data_dir_option
def deployments(model: str | None, data_dir: Path) -> None:
    """List deployed model versions: state, traffic, Triton model, batching."""
    if model is not None and "/versions/" in model:
        raise click.BadParameter("a model (models/M), not a version", param_hint="--model")
    targets = inference_targets(data_dir)
    for n, target in enumerate(targets):
        with inference(data_dir, target) as (_, stub):
            found = _list_deployments(stub, target, model or "")
        if len(targets) > 1:
            # Each replica serves its own deployments: one table each, so a replica that differs shows.
            click.echo(f"{'' if n == 0 else chr(10)}{target}:")
        _print_deployments(found, target, model)


def _print_deployments(found: Sequence[inference_pb.Deployment], target: str, model: str | None) -> None:
    if not found:
        click.echo(
            f"nothing deployed{f' of {model}' if model else ''} on {target}; deploy with: visiontune deploy models/M"
        )
        return
    width = max(13, *(len(d.model_version) for d in found))
    triton = max(12, *(len(d.triton_model) for d in found))
    click.echo(
        f"{'model version':<{width}}  {'state':<7}  {'weight':>6}  {'share':>5}  {'triton model':<{triton}}  "
        f"{'device':<6}  {'deployed (UTC)':<19}  batching"
    )
    for d in found:
        deployed = d.deploy_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{d.model_version:<{width}}  {_deployment_state(d.state):<7}  {d.traffic_weight:>6}  "
            f"{_traffic_share(d, found):>5}  {d.triton_model:<{triton}}  {d.device:<6}  {deployed:<19}  "
            f"{_batching(d)}"
        )


def _image_files(paths: Sequence[Path]) -> list[Path]:
    """The files given, and every image file under the directories given (by suffix, sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise click.ClickException(f"{path}: no image files in it ({suffixes})")
            files.extend(found)
        else:
            files.append(path)
    return files


def _chunks(files: Sequence[Path]) -> list[list[Path]]:
    """Consecutive groups of at most 64 files and 48 MiB (one alone when it is larger)."""
    chunks: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for path in files:
        nbytes = path.stat().st_size
        if current and (len(current) == _CLASSIFY_MAX_IMAGES or size + nbytes > _CLASSIFY_MAX_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(path)
        size += nbytes
    if current:
        chunks.append(current)
    return chunks


def _image_field(chunk: Sequence[Path]) -> Callable[[str], str]:
    """`images[3].content` -> the file it was."""

    def name(field: str) -> str:
        match = re.fullmatch(r"images\[(\d+)\](?:\.content)?", field)
        if match and int(match.group(1)) < len(chunk):
            return str(chunk[int(match.group(1))])
        return {"top_k": "--top-k", "unknown_threshold": "--threshold", "model": "--model"}.get(field, field)

    return name


@cli.command()
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--model",
    required=True,
    callback=_model_option_value,
    help="models/M (traffic split over its live versions) or models/M/versions/V (that version).",
)
@click.option("--top-k", type=int, default=None, help="Labels per image [default: the service's, up to 5].")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Open-set threshold for this request [default: the model's, from training].",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON array: one object per image, with its request_id and index for feedback.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds to wait for each request.",
)
@data_dir_option
def classify(
    images: tuple[Path, ...],
    model: str,
    top_k: int | None,
    threshold: float | None,
    as_json: bool,
    timeout: float,
    data_dir: Path,
) -> None:
    """Classify images with a deployed model.

    IMAGE is an image file, or a directory: every image file under it. Prints each image's top label and
    score, whether it is of a known class or UNKNOWN (its open-set score against the threshold), and the
    other top-k labels; then the request id(s) that feedback refers to. Images go in requests of at most 64.
    Exit 2 for a request the service refuses as invalid (such as a file that is not an image), 1 for other
    failures.
    """
    files = _image_files(images)
    chunks = _chunks(files)
    responses: list[tuple[list[Path], inference_pb.ClassifyResponse]] = []
    with inference(data_dir) as (target, stub):
        for chunk in chunks:
            request = inference_pb.ClassifyRequest(
                model=model, images=[inference_pb.Image(content=p.read_bytes(), client_id=p.name) for p in chunk]
            )
            if top_k is not None:
                request.top_k = top_k
            if threshold is not None:
                request.unknown_threshold = threshold
            try:
                response = stub.Classify(request, timeout=timeout)
            except grpc.RpcError as err:
                raise rpc_failed(target, err, field_name=_image_field(chunk)) from err
            responses.append((chunk, response))
    if as_json:
        _print_classifications_json(responses)
    else:
        _print_classifications(responses)


def _print_classifications_json(responses: Sequence[tuple[list[Path], inference_pb.ClassifyResponse]]) -> None:
    rows = []
    for chunk, response in responses:
        for c in response.classifications:
            rows.append(
                {
                    "file": str(chunk[c.index]),
                    "request_id": response.request_id,
                    "index": c.index,
                    "model_version": response.model_version,
                    "label": c.top_k[0].label,
                    "score": c.top_k[0].score,
                    "unknown": c.unknown,
                    "unknown_score": c.unknown_score,
                    "threshold": c.threshold,
                    "top_k": [{"label": s.label, "score": s.score} for s in c.top_k],
                }
            )
    click.echo(json.dumps(rows, indent=2))


def _shown(path: Path) -> str:
    """A path as short as it can be told: relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd())) if path.is_absolute() else str(path)
    except ValueError:
        return str(path)


def _print_classifications(responses: Sequence[tuple[list[Path], inference_pb.ClassifyResponse]]) -> None:
    many = len(responses) > 1
    files = [_shown(p) for chunk, _ in responses for p in chunk]
    fw = max(4, *(len(f) for f in files))
    labels = [s.label for _, r in responses for c in r.classifications for s in c.top_k]
    lw = max(5, *(len(label) for label in labels))
    head = f"{'req':>3}  " if many else ""
    click.echo(
        f"{head}{'#':>3}  {'file':<{fw}}  {'label':<{lw}}  {'score':>5}  {'verdict':<7}  "
        f"{'open-set score':<21}  other top-k"
    )
    for n, (chunk, response) in enumerate(responses, start=1):
        for c in response.classifications:
            top = c.top_k[0]
            verdict = "UNKNOWN" if c.unknown else "known"
            versus = f"{c.unknown_score:.3f} {'<' if c.unknown else '>='} {c.threshold:.3f}"
            others = ", ".join(f"{s.label} {s.score:.3f}" for s in c.top_k[1:]) or "-"
            req = f"{n:>3}  " if many else ""
            click.echo(
                f"{req}{c.index:>3}  {_shown(chunk[c.index]):<{fw}}  {top.label:<{lw}}  {top.score:>5.3f}  "
                f"{verdict:<7}  {versus:<21}  {others}"
            )
    known = sum(not c.unknown for _, r in responses for c in r.classifications)
    total = sum(len(r.classifications) for _, r in responses)
    click.echo(f"{known} of {count(total, 'image')} accepted as a known class, {total - known} UNKNOWN")
    for n, (chunk, response) in enumerate(responses, start=1):
        req = f"req {n}: " if many else ""
        click.echo(
            f"{req}request {response.request_id} answered by {response.model_version} "
            f"({count(len(chunk), 'image')}, {_milliseconds(response.latency):.0f} ms)"
        )
    example = responses[0][1].request_id
    click.echo(f"report the truth: visiontune feedback {example} INDEX --label LABEL   (or --unknown)")


@cli.command()
@click.argument("request_id")
@click.argument("index", type=click.IntRange(min=0))
@click.option("--label", default=None, help="The image's true label, one of the model's.")
@click.option("--unknown", is_flag=True, help="The image was of none of the model's classes.")
@data_dir_option
def feedback(request_id: str, index: int, label: str | None, unknown: bool, data_dir: Path) -> None:
    """Report the truth about a classified image: its label, or --unknown.

    REQUEST_ID and INDEX are what `visiontune classify` printed for the image."""
    if (label is None) == (not unknown):
        raise click.UsageError("give exactly one of --label LABEL or --unknown")
    request = inference_pb.ReportFeedbackRequest(request_id=request_id, index=index)
    if label is not None:
        request.true_label = label
    else:
        request.unknown = True
    with inference(data_dir) as (target, stub):
        try:
            response = stub.ReportFeedback(request, timeout=30)
        except grpc.RpcError as err:
            fields = {"true_label": "--label", "index": "INDEX", "request_id": "REQUEST_ID"}
            raise rpc_failed(target, err, field_name=lambda f: fields.get(f, f)) from err
    outcome = _OUTCOMES.get(response.outcome, enum_word(inference_pb.FeedbackOutcome.DESCRIPTOR, response.outcome))
    click.echo(f"{request_id} #{index} ({response.model_version}): {outcome}")
    if response.duplicate:
        click.echo("duplicate: this image already had feedback; the outcome above is the first report's, counted once")


def _metric_samples(text: str, *, everything: bool) -> list[tuple[str, str]]:
    """(series, value) of the visiontune_inference_* samples in a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line.startswith(_METRIC_PREFIX):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name.endswith("_created") or (name.endswith("_bucket") and not everything):
            continue
        samples.append((series, value))
    return samples


@cli.command()
@click.option("--grep", "pattern", default=None, metavar="SUBSTRING", help="Only samples whose line contains it.")
@click.option("--all", "everything", is_flag=True, help="Histogram buckets too.")
@data_dir_option
def metrics(pattern: str | None, everything: bool, data_dir: Path) -> None:
    """Print the inference service's metrics: its visiontune_inference_* Prometheus samples, each replica's.

    Every replica counts what it answered, so with several the fleet's count is the sum of a counter over the
    replicas (what the alerts compute), and a gauge such as the rolling false-positive rate is one replica's."""
    endpoints = inference_metrics_urls(data_dir)
    rows: list[tuple[str, str, str]] = []
    for replica, url in endpoints:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError) as err:
            raise click.ClickException(f"{url}: {getattr(err, 'reason', err)}") from err
        samples = _metric_samples(text, everything=everything)
        rows += [(replica, s, v) for s, v in samples if not pattern or pattern in f"{s} {v}"]
    where = endpoints[0][1] if len(endpoints) == 1 else f"{count(len(endpoints), 'replica')}"
    if not rows:
        click.echo(f"no {_METRIC_PREFIX}* samples{f' matching {pattern!r}' if pattern else ''} at {where} yet")
        return
    width = max(len(s) for _, s, _ in rows)
    several = len(endpoints) > 1
    replica_width = max(len(r) for r, _ in endpoints)
    for replica, series, value in rows:
        column = f"{replica:<{replica_width}}  " if several else ""
        click.echo(f"{column}{series:<{width}}  {value}")
    if several:
        urls = ", ".join(f"{r} {u}" for r, u in endpoints)
        click.echo(
            f"({count(len(rows), 'sample')} from {where}: {urls}; each replica counts what it answered, so the "
            "fleet's count is a counter's sum over the replicas, and a gauge is the replica's own)"
        )
    else:
        click.echo(f"({count(len(rows), 'sample')} from {where})")
