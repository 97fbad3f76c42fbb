"""Benchmark: serving one classifier through our Classify API, through Triton directly, and in-process.

    python -m bench.serve                       # defaults: about 4-6 minutes on a 2-core CPU
    python -m bench.serve --quick               # 1 s per point, concurrency 1 and 8 (the smoke test)
    python -m bench.serve --concurrency 1,4,16 --seconds 20 --queue-delay-ms 5

One run starts a real S3 server and a real inference service (`python -m inference_service`, so a real Triton
server with its Python backend), on free loopback ports. It publishes a real classifier to the bucket, made
and exported the way the trainer makes it: `build_classifier` for MobileNetV2 (ImageNet base weights from the
offline package when available, else random), a fresh 10-label head, `export_torchscript` at --size px (uint8
input, normalisation inside the graph), and a manifest with the trainer's preprocessing. The same network is
also published as versions exported before the uint8 input were: a float32 graph, the manifest's input_format
unset, which the service normalises for. DeployModel loads both into Triton with --max-batch-size and a
dynamic-batching queue delay of --queue-delay-ms. The trainer's export is then measured three ways:

  Classify        our API: one encoded JPEG per ClassifyRequest (default top_k, no request_id), pinned to the
                  trainer's export, so each request pays for decode and resize in the service, a Triton call, softmax,
                  top-k and the open-set verdict, the prediction record (one INSERT into the prediction
                  store, a SQLite file by default) and the metrics.
  Triton direct   tritonclient.grpc against the Triton that the service runs, on the deployed model: the
                  same images already decoded and resized (visiontune.preprocessing, as the service
                  does), one uint8 [1, 3, S, S] tensor per request, as the service sends for one image.
  in-process      the same TorchScript file with torch.jit.load in this process, on the preprocessed
                  pixels, at batch sizes 1, 8, 32 and 64 under torch.inference_mode (what the Triton model
                  runs); the best images/s at the median batch time is the ceiling (the median keeps other
                  processes' bursts out of it; the throughput over all batches is shown beside it). Torch
                  threads: the number the service gives a Triton model instance on CPU (cpu_count //
                  instance_count, see inference_service/engine.py), unless --threads.

For each concurrency C, C client threads run requests back to back for --warmup s, then --seconds s; a
request counts when it completes inside the measured window (throughput = those / window; p50/p99 over
their latencies). Each client thread has its own gRPC channel with its own connection (Classify) or its own
InferenceServerClient (Triton direct; tritonclient clients are not thread-safe), like C independent clients.
The client threads run in this process, on the same machine as the servers: on a small CPU they take cores
from the servers, so the report gives the CPU each side used (client, service, Triton) per image.

Before the load, every image goes once through each path of both versions and the answers are compared with
the in-process float32 graph's: Triton's logits and Classify's top-1 probability must agree with it to 1e-3.
The report gives the input bytes per image each version's requests carry to Triton (float32 vs uint8: 4x).

Exits 0 when every request succeeded, 1 when any failed or the answers disagree (the report names them), 2 on
bad arguments. Results go to bench/results/serve.md (--output), which the README links.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torchvision
import tritonclient.grpc as triton_grpc
from google.protobuf import duration_pb2
from visiontune.devstack.launch import InferenceProcess, launch_inference
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import inference_service_pb2_grpc, manifest_pb2

from bench.console import progress, write_report
from bench.machine import cpu_model, load_average
from bench.serve_load import (
    CHANNEL_OPTIONS,
    CLASSIFY,
    TRITON,
    classify_client,
    payload_bytes_per_image,
    run_point,
    triton_client,
    triton_input,
)
from bench.serve_model import (
    FLOAT_VERSION_ID,
    OUTPUT_NAME,
    PHOTO_SIDE,
    export_model,
    load_torchscript,
    make_jpegs,
    normalized,
    preprocess,
    publish,
)
from bench.serve_report import problems, render_markdown

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "serve.md"
MODULE_COMMAND = ("python", "-m", "bench.serve")
PATHS = (CLASSIFY, TRITON)
CEILING_BATCHES = (1, 8, 32, 64)
QUICK_CEILING_BATCHES = (1, 8, 32)
QUICK_AGREEMENT_IMAGES = 16
# TorchScript's profiling executor profiles the first call with a new input shape and optimises on the next:
# the first two or three calls at each batch size are slow, and are kept out of the ceiling's timing.
JIT_WARMUP_CALLS = 3
MIN_TIMED_BATCHES = 3
FIRST_CALLS = 4  # the first requests after DeployModel, reported on their own (the model's warm-up)
# --quick: the smoke test's run. Also: ceiling at batch sizes 1, 8, 32 only, agreement on the first 16 images.
QUICK = {"seconds": 1.0, "warmup": 0.5, "concurrency": (1, 8)}


@dataclass(frozen=True)
class Settings:
    size: int = 96
    seconds: float = 10.0
    warmup: float = 2.0
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_batch_size: int = 32
    queue_delay_ms: float = 2.0
    images: int = 64
    classes: int = 10
    # As inference_service/engine.py gives one Triton model instance on a CPU.
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    weights: str = "imagenet"
    seed: int = 0
    quick: bool = False

    def check(self) -> None:
        for name in ("size", "images", "classes", "threads", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.size < 32:
            raise ValueError(f"--size must be at least 32 (MobileNetV2 downsamples 32x), got {self.size}")
        if self.seconds <= 0 or self.warmup < 0:
            raise ValueError(f"--seconds must be > 0 and --warmup >= 0, got {self.seconds} and {self.warmup}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {list(self.concurrency)}")
        if not 0 <= self.queue_delay_ms <= 1000:
            raise ValueError(f"--queue-delay-ms must be in [0, 1000], got {self.queue_delay_ms}")
        if self.max_batch_size > 1024:
            raise ValueError(f"--max-batch-size must be at most 1024, got {self.max_batch_size}")


# -- the in-process ceiling ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CeilingPoint:
    batch_size: int
    images_per_second: float  # at the median batch time: what the model sustains when nothing interferes
    images_per_second_overall: float  # timed images / timed seconds: includes interference from other processes
    batch_p50_ms: float
    batches: int
    cpu_ms_per_image: float  # this process's CPU time over the timed batches


def ceiling(
    model: torch.jit.ScriptModule,
    tensors: np.ndarray[Any, Any],
    settings: Settings,
    batch_sizes: Sequence[int] = CEILING_BATCHES,
) -> list[CeilingPoint]:
    """The TorchScript model in this process, back-to-back batches for --warmup, then --seconds, per size."""
    source = torch.from_numpy(tensors)
    out = []
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        for b in batch_sizes:
            batch = source[torch.arange(b) % len(source)].contiguous()
            times: list[float] = []
            with torch.inference_mode():
                for _ in range(JIT_WARMUP_CALLS):  # TorchScript's profiling executor re-optimises per new shape
                    model(batch)
                warm_end = time.perf_counter() + settings.warmup
                while time.perf_counter() < warm_end:
                    model(batch)
                # Timed: back-to-back batches for --seconds, and at least MIN_TIMED_BATCHES of them.
                end = time.perf_counter() + settings.seconds
                cpu_start = time.process_time()
                while (now := time.perf_counter()) < end or len(times) < MIN_TIMED_BATCHES:
                    model(batch).float()
                    times.append(time.perf_counter() - now)
                cpu = time.process_time() - cpu_start
            median = float(np.median(times))
            out.append(
                CeilingPoint(
                    b, b / median, b * len(times) / sum(times), median * 1e3, len(times), cpu * 1e3 / (b * len(times))
                )
            )
            progress(
                f"in-process batch {b:3d}: {out[-1].images_per_second:8.1f} images/s at the median batch, "
                f"{out[-1].images_per_second_overall:8.1f} overall"
            )
    finally:
        torch.set_num_threads(previous)
    return out


# -- agreement --------------------------------------------------------------------------------------------------


def agreement(
    service: Service,
    name: str,
    triton_model: str,
    tensors: np.ndarray[Any, Any],
    jpegs: Sequence[bytes],
    reference: torch.Tensor,
) -> dict[str, Any]:
    """Each image once through Classify and Triton; the largest differences from the in-process model."""
    probabilities = reference.softmax(dim=1)
    first_ms: list[float] = []  # the first requests after DeployModel: Triton direct, then Classify
    client = triton_grpc.InferenceServerClient(service.process.triton_grpc)
    try:
        triton_logits = []
        for i in range(len(tensors)):
            tensor = triton_input(tensors[i : i + 1])
            before = time.perf_counter()
            triton_logits.append(client.infer(triton_model, [tensor]).as_numpy(OUTPUT_NAME))
            if i < FIRST_CALLS:
                first_ms.append((time.perf_counter() - before) * 1e3)
    finally:
        client.close()
    triton_diff = float(np.abs(np.concatenate(triton_logits) - reference.numpy()).max())
    prob_diff, top1_same = 0.0, 0
    for i, jpeg in enumerate(jpegs):
        before = time.perf_counter()
        top = service.classify(name, jpeg).classifications[0].top_k[0]
        if i < FIRST_CALLS:
            first_ms.append((time.perf_counter() - before) * 1e3)
        expected = int(probabilities[i].argmax())
        top1_same += int(top.label == f"class-{expected}")
        prob_diff = max(prob_diff, abs(top.score - float(probabilities[i].max())))
    return {
        "triton_max_logit_diff": triton_diff,
        "classify_max_top1_prob_diff": prob_diff,
        "classify_top1_agree": top1_same,
        "images": len(jpegs),
        "first_triton_ms": first_ms[:FIRST_CALLS],
        "first_classify_ms": first_ms[FIRST_CALLS:],
    }


# -- the benchmark ------------------------------------------------------------------------------------------------


@dataclass
class Service:
    """A running `python -m inference_service` (visiontune.devstack.launch) and a gRPC stub on it."""

    process: InferenceProcess
    channel: grpc.Channel
    stub: inference_service_pb2_grpc.InferenceServiceStub

    def deploy(self, name: str, max_batch_size: int, queue_delay_ms: float) -> pb.Deployment:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(queue_delay_ms * 1e6))
        deployment: pb.Deployment = self.stub.DeployModel(
            pb.DeployModelRequest(model_version=name, max_batch_size=max_batch_size, max_queue_delay=delay), timeout=300
        )
        return deployment

    def classify(self, model: str, image: bytes) -> pb.ClassifyResponse:
        response: pb.ClassifyResponse = self.stub.Classify(
            pb.ClassifyRequest(model=model, images=[pb.Image(content=image)]), timeout=60
        )
        return response

    def stop(self) -> None:
        self.channel.close()
        self.process.stop()


def start_service(s3: S3ServerProcess, bucket: str, data_dir: Path, timeout: float = 180.0) -> Service:
    process = launch_inference(s3.settings(bucket), data_dir, timeout=timeout)
    channel = grpc.insecure_channel(process.target, options=CHANNEL_OPTIONS)
    return Service(process, channel, inference_service_pb2_grpc.InferenceServiceStub(channel))


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[tuple[ArtifactStore, Service]]:
    """A real S3 server and a real inference service (with its Triton) for the duration of the block."""
    s3 = S3ServerProcess(
        workdir / "s3", access_key="bench-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24)
    )
    s3.start(timeout=60)
    service: Service | None = None
    try:
        store = ArtifactStore.connect(s3.settings("bench-serve"))
        store.ensure_bucket()
        service = start_service(s3, store.bucket, workdir / "inference")
        yield store, service
    except BaseException:
        if service is not None:
            progress(f"inference service log ({service.process.log}), last lines:\n{service.process.log_tail()}")
        raise
    finally:
        if service is not None:
            service.stop()
        s3.stop()


def benchmark(settings: Settings) -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    settings.check()
    started = time.perf_counter()
    load_before = load_average()
    labels = [f"class-{i}" for i in range(settings.classes)]
    jpegs = make_jpegs(settings.images, PHOTO_SIDE, settings.seed)
    with tempfile.TemporaryDirectory(prefix="vt-bench-serve-") as tmp:
        workdir = Path(tmp)
        weights_path, float_path = workdir / "model.pt", workdir / "model-float.pt"
        progress("building and exporting the model ...")
        described, mean, std = export_model(
            weights_path, float_path, settings.size, settings.classes, settings.weights, settings.seed
        )
        pixels = preprocess(jpegs, settings.size)
        tensors = normalized(pixels, mean, std)
        model, float_model = load_torchscript(weights_path), load_torchscript(float_path)
        with torch.inference_mode():
            reference = float_model(torch.from_numpy(tensors)).float()
            uint8_graph_diff = float((model(torch.from_numpy(pixels)).float() - reference).abs().max())
        decode_start = time.perf_counter()
        preprocess(jpegs, settings.size)
        preprocess_ms = (time.perf_counter() - decode_start) * 1e3 / len(jpegs)
        normalise_start = time.perf_counter()
        normalized(pixels, mean, std)
        normalise_ms = (time.perf_counter() - normalise_start) * 1e3 / len(jpegs)

        progress("in-process ceiling ...")
        ceiling_points = ceiling(model, pixels, settings, QUICK_CEILING_BATCHES if settings.quick else CEILING_BATCHES)
        # The float32 graph at the uint8 graph's best batch size: the two graphs' speed on the same machine.
        best_batch = max(ceiling_points, key=lambda c: c.images_per_second).batch_size
        float_ceiling = ceiling(float_model, tensors, settings, (best_batch,))[0]

        progress("starting S3 and the inference service (Triton) ...")
        with running_stack(workdir) as (store, service):
            name = publish(store, weights_path, labels, settings.size, mean, std)
            float_name = publish(
                store,
                float_path,
                labels,
                settings.size,
                mean,
                std,
                version=FLOAT_VERSION_ID,
                input_format=manifest_pb2.INPUT_FORMAT_UNSPECIFIED,
            )
            deploy_start = time.perf_counter()
            deployment = service.deploy(name, settings.max_batch_size, settings.queue_delay_ms)
            deploy_seconds = time.perf_counter() - deploy_start
            float_deployment = service.deploy(float_name, settings.max_batch_size, settings.queue_delay_ms)
            for d in (deployment, float_deployment):
                if d.state != pb.DEPLOYMENT_STATE_READY:
                    raise RuntimeError(f"{d.model_version} is {pb.DeploymentState.Name(d.state)} after DeployModel")
            progress(f"{name} deployed as Triton model {deployment.triton_model} in {deploy_seconds:.1f} s")
            checked = QUICK_AGREEMENT_IMAGES if settings.quick else len(jpegs)
            agree = agreement(
                service, name, deployment.triton_model, pixels[:checked], jpegs[:checked], reference[:checked]
            )
            progress(f"agreement: {agree}")
            float_agree = agreement(
                service,
                float_name,
                float_deployment.triton_model,
                tensors[:checked],
                jpegs[:checked],
                reference[:checked],
            )
            progress(f"agreement of the float32 version: {float_agree}")

            connectors = {
                CLASSIFY: classify_client(service.process.target, name, jpegs),
                TRITON: triton_client(service.process.triton_grpc, deployment.triton_model, pixels),
            }
            points = []
            for round_index, concurrency in enumerate(settings.concurrency):
                # Alternating which path goes first spreads slow drifts in machine load over both.
                for path in PATHS if round_index % 2 == 0 else PATHS[::-1]:
                    endpoints = (service.process.metrics_url, service.process.triton_metrics_url)
                    point = run_point(
                        path,
                        concurrency,
                        connectors[path],
                        len(jpegs),
                        settings.warmup,
                        settings.seconds,
                        service.process.proc.pid,
                        endpoints,
                    )
                    points.append(point)
                    progress(
                        f"{path:13} c={concurrency:3d}: {point.images_per_second:8.1f} images/s, "
                        f"p50 {point.p50_ms:7.2f} ms, p99 {point.p99_ms:7.2f} ms, failed {point.failed}"
                    )

    device = (
        "cpu (no GPU visible to torch)"
        if not torch.cuda.is_available()
        else f"cuda ({torch.cuda.get_device_name(0)}); Triton ran the model on the GPU"
    )
    return {
        "settings": asdict(settings),
        "weights": described,
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": settings.threads,
            "device": device,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "tritonclient": _version("tritonclient"),
            "triton": _version("nvidia-pytriton"),
            "grpcio": grpc.__version__,
            "python": platform.python_version(),
            "load_average": [load_before, load_average()],
        },
        "deploy_seconds": deploy_seconds,
        "preprocess_ms_per_image": preprocess_ms,
        "normalise_ms_per_image": normalise_ms,
        "uint8_graph_max_logit_diff": uint8_graph_diff,
        "payload_bytes_per_image": {
            "float32": payload_bytes_per_image(tensors),
            "uint8": payload_bytes_per_image(pixels),
        },
        "agreement": agree,
        "agreement_float": float_agree,
        "ceiling": [asdict(c) for c in ceiling_points],
        "float_ceiling": asdict(float_ceiling),
        "points": [{**asdict(p), "images_per_second": p.images_per_second} for p in points],
        "wall_seconds": time.perf_counter() - started,
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- command line -------------------------------------------------------------------------------------------------


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("at least one concurrency is needed")
    return values


def parse_args(argv: Sequence[str]) -> tuple[Settings, Path]:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=d.size, help="model input side in px (default %(default)s)")
    p.add_argument("--seconds", type=float, default=None, help=f"measured seconds per point (default {d.seconds:g})")
    p.add_argument("--warmup", type=float, default=None, help=f"warm-up seconds per point (default {d.warmup:g})")
    p.add_argument(
        "--concurrency",
        type=_concurrency,
        default=None,
        help="comma-separated client threads (default " + ",".join(map(str, d.concurrency)) + ")",
    )
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="Triton (default %(default)s)")
    p.add_argument(
        "--queue-delay-ms",
        type=float,
        default=d.queue_delay_ms,
        help="Triton dynamic batching max queue delay (default %(default)s)",
    )
    p.add_argument("--images", type=int, default=d.images, help="distinct JPEGs (default %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads in-process (default %(default)s: what the service gives a Triton instance)",
    )
    p.add_argument("--weights", choices=("imagenet", "none"), default=d.weights, help="(default %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for the smoke test: 1 s per point, 0.5 s warm-up, concurrency 1,8, ceiling at batch "
        "1, 8, 32, agreement on 16 images "
        "(explicit --seconds/--warmup/--concurrency still win)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report (default bench/results/...)")
    a = p.parse_args(list(argv))

    def pick(name: str) -> Any:
        given = getattr(a, name)
        if given is not None:
            return given
        return QUICK[name] if a.quick else getattr(d, name)

    settings = Settings(
        size=a.size,
        seconds=pick("seconds"),
        warmup=pick("warmup"),
        concurrency=pick("concurrency"),
        max_batch_size=a.max_batch_size,
        queue_delay_ms=a.queue_delay_ms,
        images=a.images,
        threads=a.threads,
        weights=a.weights,
        quick=a.quick,
    )
    return settings, a.output


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every request succeeded and the paths agree, 1 otherwise, 2 on bad arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings, output = parse_args(args)
    try:
        settings.check()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = benchmark(settings)
    report = render_markdown(result, shlex.join([*MODULE_COMMAND, *args]), dt.datetime.now(dt.UTC))
    write_report(report, output)
    issues = problems(result)
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
