"""Benchmark: serving one classifier through our Classify API, through Triton directly, and in-process.

    python -m bench.serve                       # defaults: about 3 minutes on a 2-core CPU
    python -m bench.serve --quick               # 1 s per point, concurrency 1 and 8 (the smoke test)
    python -m bench.serve --concurrency 1,4,16 --seconds 20 --queue-delay-ms 5

One run starts a real S3 server and a real inference service (`python -m inference_service`, so a real Triton
server with its Python backend), on free loopback ports. It publishes a real classifier to the bucket, made
and exported the way the trainer makes it: `build_classifier` for MobileNetV2 (ImageNet base weights from the
offline package when available, else random), a fresh 10-label head, `export_torchscript` at --size px, and a
manifest with the trainer's preprocessing. DeployModel loads it into Triton with --max-batch-size and a
dynamic-batching queue delay of --queue-delay-ms. The same model file is then measured three ways:

  Classify        our API: one encoded JPEG per ClassifyRequest (default top_k, no request_id), so each
                  request pays for decode, resize and normalise in the service, a Triton call, softmax,
                  top-k and the open-set verdict, the feedback log and the metrics.
  Triton direct   tritonclient.grpc against the Triton that the service runs, on the deployed model: the
                  same images already decoded and normalised (visiontune.preprocessing, as the service
                  does), one float32 [1, 3, S, S] tensor per request, as the service sends for one image.
  in-process      the same TorchScript file with torch.jit.load in this process, on the preprocessed
                  tensors, at batch sizes 1, 8, 32 and 64 under torch.inference_mode (what the Triton model
                  runs); the best images/s at the median batch time is the ceiling (the median keeps other
                  processes' bursts out of it; the throughput over all batches is shown beside it). Torch
                  threads: the number the service gives a Triton model instance on CPU (cpu_count //
                  instance_count, see serving.py), unless --threads.

For each concurrency C, C client threads run requests back to back for --warmup s, then --seconds s; a
request counts when it completes inside the measured window (throughput = those / window; p50/p99 over
their latencies). Each client thread has its own gRPC channel with its own connection (Classify) or its own
InferenceServerClient (Triton direct; tritonclient clients are not thread-safe), like C independent clients.
The client threads run in this process, on the same machine as the servers: on a small CPU they take cores
from the servers, so the report gives the CPU each side used (client, service, Triton) per image.

Before the load, every image goes once through each path and the answers are compared with the in-process
model's: Triton's logits and Classify's top-1 probability must agree with it to 1e-3.

Exits 0 when every request succeeded, 1 when any failed or the answers disagree (the report names them), 2 on
bad arguments. Results go to bench/results/serve.md (--output), which the README links.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import io
import os
import platform
import secrets
import shlex
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torchvision
import tritonclient.grpc as triton_grpc
from google.protobuf import duration_pb2, json_format
from PIL import Image
from trainer_service.engine.models import WeightsUnavailable, build_classifier, export_torchscript, normalization
from trainer_service.spec.config import Architecture, ModelConfig
from trainer_service.weights import load_base_weights
from visiontune.devstack.launch import InferenceProcess, launch_inference
from visiontune.devstack.s3server import S3ServerProcess
from visiontune.preprocessing import center_crop, decode_hwc, normalize
from visiontune.store import ArtifactStore, sha256_file
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import inference_service_pb2_grpc, job_pb2, manifest_pb2, training_spec_pb2

from bench.machine import cpu_model

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "serve.md"
MODULE_COMMAND = ("python", "-m", "bench.serve")
SERVICE_NAME = "visiontune.v1.InferenceService"
MODEL_ID = "bench-serve"
VERSION_ID = "v1"
CLASSIFY = "Classify"
TRITON = "Triton direct"
PATHS = (CLASSIFY, TRITON)
CEILING_BATCHES = (1, 8, 32, 64)
QUICK_CEILING_BATCHES = (1, 8, 32)
QUICK_AGREEMENT_IMAGES = 16
PHOTO_SIDE = 256  # the encoded images' side: decode + resize to --size is part of Classify's work
AGREEMENT_TOLERANCE = 1e-3
# TorchScript's profiling executor profiles the first call with a new input shape and optimises on the next:
# the first two or three calls at each batch size are slow, and are kept out of the ceiling's timing.
JIT_WARMUP_CALLS = 3
MIN_TIMED_BATCHES = 3
FIRST_CALLS = 4  # the first requests after DeployModel, reported on their own (the model's warm-up)
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # what the trainer's manifest names them
MAX_MESSAGE = 64 * 1024 * 1024
# One TCP connection per client thread: without a local subchannel pool, gRPC Python shares one connection
# among every channel of a process to the same target.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
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
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))  # serving.py, instance_count 1
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


# -- inputs and the model -----------------------------------------------------------------------------------------


def make_jpegs(count: int, side: int, seed: int) -> list[bytes]:
    """Photo-like JPEGs (quality 90): a colour cast, smooth large-scale structure, a few edges, sensor noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        cast = rng.uniform(0, 255, size=(1, 1, 3)).astype(np.float32)
        pixels = 0.55 * smooth + 0.35 * cast
        for _ in range(3):  # rectangles: edges for the JPEG coder and the network
            y, x = rng.integers(0, side * 3 // 4, size=2)
            h, w = rng.integers(side // 8, side // 3, size=2)
            pixels[y : y + h, x : x + w] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, 8, size=pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def preprocess(jpegs: Sequence[bytes], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray[Any, Any]:
    """float32 [N, 3, S, S] exactly as the service's `_preprocess` makes them (resize = crop = S)."""
    chw = torch.from_numpy(np.stack([decode_hwc(j, size) for j in jpegs])).permute(0, 3, 1, 2)
    return normalize(center_crop(chw, size).contiguous(), mean, std).numpy()


def export_model(settings: Settings, path: Path) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """MobileNetV2 + a fresh head, exported as the trainer exports it; (weights described, mean, std)."""
    cfg = ModelConfig(architecture=Architecture.MOBILENET_V2)
    state = None
    described = "random initialisation (--weights none)"
    if settings.weights == "imagenet":
        try:
            state = load_base_weights(cfg, None)
            described = "ImageNet IMAGENET1K_V1 base, random 10-label head"
        except WeightsUnavailable as err:
            print(f"note: {err}; serving randomly initialised weights instead", file=sys.stderr)
            described = "random initialisation (ImageNet weights unavailable)"
    torch.manual_seed(settings.seed)
    model = build_classifier(cfg, settings.classes, state)
    export_torchscript(model, settings.size, path)
    mean, std = normalization(cfg)
    return described, mean, std


def publish(
    store: ArtifactStore, weights: Path, labels: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]
) -> str:
    """The exported file plus a manifest like the trainer's (worker._publish), committed as a model version."""
    manifest = manifest_pb2.ModelManifest(
        schema_version=1,
        name=f"models/{MODEL_ID}/versions/{VERSION_ID}",
        labels=list(labels),
        architecture=training_spec_pb2.ARCHITECTURE_MOBILENET_V2,
        preprocessing=manifest_pb2.Preprocessing(
            resize_size=size,
            crop_size=size,
            interpolation=manifest_pb2.INTERPOLATION_BILINEAR,
            mean=list(mean),
            std=list(std),
            color_mode=manifest_pb2.COLOR_MODE_RGB,
        ),
        weights=manifest_pb2.Weights(
            path="model.pt",
            format=manifest_pb2.WEIGHTS_FORMAT_TORCHSCRIPT,
            sha256=sha256_file(weights),
            size_bytes=weights.stat().st_size,
            input_name=INPUT_NAME,
            input_shape=[-1, 3, size, size],
            output_name=OUTPUT_NAME,
            output_shape=[-1, len(labels)],
        ),
        open_set=job_pb2.OpenSetResult(
            score=training_spec_pb2.OPEN_SET_SCORE_MAX_SOFTMAX, threshold=0.5, target_true_positive_rate=0.95
        ),
    )
    with store.begin_model_version(MODEL_ID, VERSION_ID) as writer:
        writer.put_file("model.pt", weights)
        writer.commit(json_format.MessageToJson(manifest).encode())
    return manifest.name


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module.eval()


# -- CPU accounting (Linux /proc; None elsewhere) -----------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime(12) stime(13)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(service_pid: int) -> dict[str, float] | None:
    """CPU seconds so far of this process (the client), the service process, and Triton (tritonserver and
    its Python-backend stubs: every descendant of the service)."""
    own = _stat("self")
    service = _stat(service_pid)
    if own is None or service is None:
        return None
    parents: dict[int, tuple[int, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (found := _stat(entry)) is not None:
                parents[int(entry)] = found
    descendants, frontier = 0.0, {service_pid}
    while frontier:
        children = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        descendants += sum(parents[pid][1] for pid in children)
        frontier = children
    return {"client": own[1], "service": service[1], "triton": descendants}


# -- the servers' own metrics (Prometheus text) -------------------------------------------------------------------


TRITON_METRICS = (
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_success",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
)
SERVICE_METRICS = tuple(
    f"visiontune_inference_{name}_duration_seconds_{part}"
    for name in ("request", "preprocess", "triton")
    for part in ("sum", "count")
)


def scrape(urls: Sequence[str]) -> dict[str, float] | None:
    """The samples of TRITON_METRICS and SERVICE_METRICS for our model, summed over label sets; None if a
    metrics endpoint does not answer."""
    totals = dict.fromkeys((*TRITON_METRICS, *SERVICE_METRICS), 0.0)
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name in totals and MODEL_ID in rest.partition("}")[0]:
                totals[name] += float(rest.rpartition("}")[2].split()[0])
    return totals


def inside(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Means over the window from two scrapes: Triton's batch size, queue, execution and request time per
    request; the service's whole Classify, preprocessing and Triton-call time per request."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in before}
    if not d["nv_inference_exec_count"] or not d["nv_inference_request_success"]:
        return None
    per_request = d["nv_inference_request_success"] * 1e3  # us -> ms per request
    out = {
        "triton_batch": d["nv_inference_count"] / d["nv_inference_exec_count"],
        "triton_queue_ms": d["nv_inference_queue_duration_us"] / per_request,
        # Each request of a batch is charged the whole batch's execution: this is the mean batch time.
        "triton_compute_ms": d["nv_inference_compute_infer_duration_us"] / per_request,
        "triton_request_ms": d["nv_inference_request_duration_us"] / per_request,
    }
    calls = d["visiontune_inference_request_duration_seconds_count"]
    if calls:
        for name in ("request", "preprocess", "triton"):
            out[f"service_{name}_ms"] = d[f"visiontune_inference_{name}_duration_seconds_sum"] * 1e3 / calls
    return out


# -- load generation ----------------------------------------------------------------------------------------------


Call = Callable[[int], None]  # one request for image i; raises on failure


@dataclass
class _ThreadLog:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    path: str
    concurrency: int
    completed: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: tuple[str, ...]
    cpu_ms_per_image: dict[str, float] | None
    servers: dict[str, float] | None  # `inside`: means from the servers' metrics over the window

    @property
    def images_per_second(self) -> float:
        return self.completed / self.seconds


def run_point(
    path: str,
    concurrency: int,
    connect: Callable[[], tuple[Call, Callable[[], None]]],
    images: int,
    settings: Settings,
    service_pid: int,
    metrics_urls: Sequence[str],
) -> Point:
    """`concurrency` threads, each with its own client from `connect`, calling back to back."""
    logs = [_ThreadLog() for _ in range(concurrency)]
    clock: dict[str, float] = {}

    def set_clock() -> None:  # run by the last thread to reach the barrier, before any is released
        clock["window_start"] = time.perf_counter() + settings.warmup
        clock["window_end"] = clock["window_start"] + settings.seconds

    barrier = threading.Barrier(concurrency, action=set_clock)

    def worker(index: int) -> None:
        log = logs[index]
        try:
            call, close = connect()
        except Exception as err:  # noqa: BLE001 (a client that cannot connect fails the point, not the process)
            log.failed += 1
            log.errors.append(f"connect: {type(err).__name__}: {err}")
            barrier.abort()
            return
        try:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            start, end = clock["window_start"], clock["window_end"]
            i = index * 7  # threads start on different images
            while True:
                before = time.perf_counter()
                if before >= end:
                    return
                try:
                    call(i % images)
                except Exception as err:  # noqa: BLE001 (counted and reported; any failure fails the run)
                    log.failed += 1
                    if len(log.errors) < 3:
                        log.errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                after = time.perf_counter()
                if start <= after <= end:
                    log.latencies.append(after - before)
                i += 1
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(k,), name=f"load-{k}", daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    while "window_end" not in clock and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    cpu_before = cpu_after = metrics_before = metrics_after = None
    if "window_start" in clock:
        time.sleep(max(0.0, clock["window_start"] - time.perf_counter()))
        cpu_before, metrics_before = cpu_seconds(service_pid), scrape(metrics_urls)
        time.sleep(max(0.0, clock["window_end"] - time.perf_counter()))
        cpu_after, metrics_after = cpu_seconds(service_pid), scrape(metrics_urls)
    for t in threads:
        t.join()
    latencies = np.array([x for log in logs for x in log.latencies]) * 1e3
    completed = len(latencies)
    cpu = None
    if cpu_before is not None and cpu_after is not None and completed:
        cpu = {k: (cpu_after[k] - cpu_before[k]) * 1e3 / completed for k in cpu_before}
    return Point(
        path=path,
        concurrency=concurrency,
        completed=completed,
        failed=sum(log.failed for log in logs),
        seconds=settings.seconds,
        p50_ms=float(np.percentile(latencies, 50)) if completed else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if completed else float("nan"),
        mean_ms=float(latencies.mean()) if completed else float("nan"),
        errors=tuple(e for log in logs for e in log.errors)[:5],
        cpu_ms_per_image=cpu,
        servers=inside(metrics_before, metrics_after),
    )


def classify_client(target: str, model: str, jpegs: Sequence[bytes]) -> Callable[[], tuple[Call, Callable[[], None]]]:
    requests = [pb.ClassifyRequest(model=model, images=[pb.Image(content=j)]) for j in jpegs]

    def connect() -> tuple[Call, Callable[[], None]]:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)

        def call(i: int) -> None:
            response = stub.Classify(requests[i], timeout=60)
            if len(response.classifications) != 1:
                raise RuntimeError(f"{len(response.classifications)} classifications for one image")

        return call, channel.close

    return connect


def triton_client(
    url: str,
    triton_model: str,
    tensors: np.ndarray[Any, Any],
) -> Callable[[], tuple[Call, Callable[[], None]]]:
    def connect() -> tuple[Call, Callable[[], None]]:
        client = triton_grpc.InferenceServerClient(url, channel_args=CHANNEL_OPTIONS)
        output = [triton_grpc.InferRequestedOutput(OUTPUT_NAME)]

        def call(i: int) -> None:
            tensor = triton_grpc.InferInput(INPUT_NAME, [1, *tensors.shape[1:]], "FP32")
            tensor.set_data_from_numpy(tensors[i : i + 1])
            result = client.infer(triton_model, [tensor], outputs=output, client_timeout=60)
            logits = result.as_numpy(OUTPUT_NAME)
            if logits is None or logits.shape[0] != 1:
                raise RuntimeError(f"Triton answered {None if logits is None else logits.shape} for one image")

        return call, client.close

    return connect


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
            _progress(
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
            tensor = triton_grpc.InferInput(INPUT_NAME, [1, *tensors.shape[1:]], "FP32")
            tensor.set_data_from_numpy(tensors[i : i + 1])
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


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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
            _progress(f"inference service log ({service.process.log}), last lines:\n{service.process.log_tail()}")
        raise
    finally:
        if service is not None:
            service.stop()
        s3.stop()


def benchmark(settings: Settings) -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    settings.check()
    started = time.perf_counter()
    load_before = _load_average()
    labels = [f"class-{i}" for i in range(settings.classes)]
    jpegs = make_jpegs(settings.images, PHOTO_SIDE, settings.seed)
    with tempfile.TemporaryDirectory(prefix="vt-bench-serve-") as tmp:
        workdir = Path(tmp)
        weights_path = workdir / "model.pt"
        _progress("building and exporting the model ...")
        described, mean, std = export_model(settings, weights_path)
        tensors = preprocess(jpegs, settings.size, mean, std)
        model = load_torchscript(weights_path)
        with torch.inference_mode():
            reference = model(torch.from_numpy(tensors)).float()
        decode_start = time.perf_counter()
        preprocess(jpegs, settings.size, mean, std)
        preprocess_ms = (time.perf_counter() - decode_start) * 1e3 / len(jpegs)

        _progress("in-process ceiling ...")
        ceiling_points = ceiling(model, tensors, settings, QUICK_CEILING_BATCHES if settings.quick else CEILING_BATCHES)

        _progress("starting S3 and the inference service (Triton) ...")
        with running_stack(workdir) as (store, service):
            name = publish(store, weights_path, labels, settings.size, mean, std)
            deploy_start = time.perf_counter()
            deployment = service.deploy(name, settings.max_batch_size, settings.queue_delay_ms)
            deploy_seconds = time.perf_counter() - deploy_start
            if deployment.state != pb.DEPLOYMENT_STATE_READY:
                raise RuntimeError(f"{name} is {pb.DeploymentState.Name(deployment.state)} after DeployModel")
            _progress(f"{name} deployed as Triton model {deployment.triton_model} in {deploy_seconds:.1f} s")
            checked = QUICK_AGREEMENT_IMAGES if settings.quick else len(jpegs)
            agree = agreement(
                service, name, deployment.triton_model, tensors[:checked], jpegs[:checked], reference[:checked]
            )
            _progress(f"agreement: {agree}")

            connectors = {
                CLASSIFY: classify_client(service.process.target, f"models/{MODEL_ID}", jpegs),
                TRITON: triton_client(service.process.triton_grpc, deployment.triton_model, tensors),
            }
            points = []
            for round_index, concurrency in enumerate(settings.concurrency):
                # Alternating which path goes first spreads slow drifts in machine load over both.
                for path in PATHS if round_index % 2 == 0 else PATHS[::-1]:
                    endpoints = (service.process.metrics_url, service.process.triton_metrics_url)
                    point = run_point(
                        path, concurrency, connectors[path], len(jpegs), settings, service.process.proc.pid, endpoints
                    )
                    points.append(point)
                    _progress(
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
            "load_average": [load_before, _load_average()],
        },
        "deploy_seconds": deploy_seconds,
        "preprocess_ms_per_image": preprocess_ms,
        "agreement": agree,
        "ceiling": [asdict(c) for c in ceiling_points],
        "points": [{**asdict(p), "images_per_second": p.images_per_second} for p in points],
        "wall_seconds": time.perf_counter() - started,
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- the report ---------------------------------------------------------------------------------------------------


def problems(result: dict[str, Any]) -> list[str]:
    """Why the run counts as failed: failed requests, answers that disagree with the in-process model."""
    out = []
    for p in result["points"]:
        if p["failed"]:
            out.append(
                f"{p['path']} at concurrency {p['concurrency']}: {p['failed']} failed request(s): "
                + "; ".join(p["errors"])
            )
        if not p["completed"]:
            out.append(f"{p['path']} at concurrency {p['concurrency']}: no request completed in the window")
    a = result["agreement"]
    if a["triton_max_logit_diff"] > AGREEMENT_TOLERANCE:
        out.append(f"Triton's logits differ from the in-process model's by {a['triton_max_logit_diff']:.3g}")
    if a["classify_max_top1_prob_diff"] > AGREEMENT_TOLERANCE:
        out.append(
            f"Classify's top-1 probabilities differ from the in-process model's by "
            f"{a['classify_max_top1_prob_diff']:.3g}"
        )
    return out


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    best = max(result["ceiling"], key=lambda c: c["images_per_second"])["images_per_second"]
    by = {(p["path"], p["concurrency"]): p for p in result["points"]}
    rows = []
    for c in result["settings"]["concurrency"]:
        ours, triton = by[(CLASSIFY, c)], by[(TRITON, c)]

        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        rows.append(
            {
                "concurrency": c,
                "classify_over_triton": ratio(ours["images_per_second"], triton["images_per_second"]),
                "triton_over_ceiling": ratio(triton["images_per_second"], best),
                "classify_over_ceiling": ratio(ours["images_per_second"], best),
                "p50_classify_over_triton": ratio(ours["p50_ms"], triton["p50_ms"]),
                "p99_classify_over_triton": ratio(ours["p99_ms"], triton["p99_ms"]),
            }
        )
    return rows


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cpu(cpu: dict[str, float] | None) -> str:
    return "n/a" if cpu is None else f"{cpu['client']:.2f} / {cpu['service']:.2f} / {cpu['triton']:.2f}"


def _inside_row(p: dict[str, Any]) -> str:
    i = p["servers"]
    if i is None:
        return f"| {p['path']} | {p['concurrency']} | n/a | n/a | n/a | n/a | n/a | {p['mean_ms']:.2f} |"
    service = (
        f"{i['service_preprocess_ms']:.2f} / {i['service_triton_ms']:.2f} / {i['service_request_ms']:.2f}"
        if "service_request_ms" in i
        else "-"
    )
    return (
        f"| {p['path']} | {p['concurrency']} | {i['triton_batch']:.2f} | {i['triton_queue_ms']:.2f} "
        f"| {i['triton_compute_ms']:.2f} | {i['triton_request_ms']:.2f} | {service} | {p['mean_ms']:.2f} |"
    )


def render_markdown(result: dict[str, Any], command: str, when: dt.datetime) -> str:
    s, m, a = result["settings"], result["machine"], result["agreement"]
    best = max(result["ceiling"], key=lambda c: c["images_per_second"])
    failed = sum(p["failed"] for p in result["points"])
    lines = [
        "# Serving throughput and latency (`bench/serve`)",
        "",
        f"Run {when.strftime('%Y-%m-%d %H:%M UTC')} with `{command}`; wall time {result['wall_seconds']:.0f} s.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs) |",
        f"| device | {m['device']} |",
        f"| torch threads (in-process; the Triton model instance gets the same) | {m['torch_threads']} |",
        f"| torch / torchvision | {m['torch']} / {m['torchvision']} |",
        f"| Triton (nvidia-pytriton) / tritonclient / grpcio | {m['triton']} / {m['tritonclient']} / {m['grpcio']} |",
        f"| Python | {m['python']} |",
        f"| 1-min load average, start / end | {_load(m['load_average'][0])} / {_load(m['load_average'][1])} |",
        "",
        f"Model: MobileNetV2 ({result['weights']}), {s['classes']} labels, {s['size']}x{s['size']} input, "
        f"exported with `export_torchscript`, deployed with max_batch_size {s['max_batch_size']}, queue delay "
        f"{s['queue_delay_ms']:g} ms, 1 instance (DeployModel took {result['deploy_seconds']:.1f} s). Inputs: "
        f"{s['images']} synthetic photo-like JPEGs {PHOTO_SIDE}x{PHOTO_SIDE} (quality 90), one per request; "
        f"Triton direct gets them decoded and normalised. Each point: {s['warmup']:g} s warm-up, then "
        f"{s['seconds']:g} s measured.",
        "",
        "## Results",
        "",
        "| path | concurrency | images/s | p50 ms | p99 ms | mean ms | requests | failed "
        "| CPU ms/image: client / service / Triton |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['path']} | {p['concurrency']} | {p['images_per_second']:.1f} | {p['p50_ms']:.2f} "
            f"| {p['p99_ms']:.2f} | {p['mean_ms']:.2f} | {p['completed']} | {p['failed']} "
            f"| {_cpu(p['cpu_ms_per_image'])} |"
        )
    lines += [
        "",
        "In-process ceiling (`torch.jit.load` of the same file, preprocessed tensors, `torch.inference_mode`):",
        "",
        "| batch size | images/s (median batch) | images/s (all batches) | ms per batch (p50) | batches "
        "| CPU ms/image |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["ceiling"]:
        mark = " (**ceiling**)" if c is best else ""
        lines.append(
            f"| {c['batch_size']}{mark} | {c['images_per_second']:.1f} | {c['images_per_second_overall']:.1f} "
            f"| {c['batch_p50_ms']:.2f} | {c['batches']} | {c['cpu_ms_per_image']:.2f} |"
        )
    lines += [
        "",
        f"Decode + resize + normalise of one {PHOTO_SIDE}x{PHOTO_SIDE} JPEG to {s['size']} px in this process "
        f"(what Classify adds before Triton): {result['preprocess_ms_per_image']:.2f} ms.",
        "",
        "Inside the servers, from their own metrics over each window (means per request; Triton charges each "
        'request its whole batch\'s execution, so "execution" is the mean batch time):',
        "",
        "| path | concurrency | Triton batch size | Triton queue ms | Triton execution ms | Triton request ms "
        "| service: preprocess / Triton call / whole Classify ms | client latency ms |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        *[_inside_row(p) for p in result["points"]],
        "",
        "## Ratios",
        "",
        "| concurrency | Classify / Triton direct (images/s) | Triton direct / ceiling | Classify / ceiling "
        "| p50 Classify / Triton | p99 Classify / Triton |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratios(result):
        lines.append(
            f"| {r['concurrency']} | {r['classify_over_triton']:.3f} | {r['triton_over_ceiling']:.3f} "
            f"| {r['classify_over_ceiling']:.3f} | {r['p50_classify_over_triton']:.2f} "
            f"| {r['p99_classify_over_triton']:.2f} |"
        )
    lines += [
        "",
        f"Ceiling: {best['images_per_second']:.1f} images/s in-process at batch size {best['batch_size']}.",
        "",
        f"Failed requests: {failed}. Agreement with the in-process model over {a['images']} images: Triton "
        f"logits max |diff| {a['triton_max_logit_diff']:.2e}; Classify top-1 probability max |diff| "
        f"{a['classify_max_top1_prob_diff']:.2e}, top-1 label equal on {a['classify_top1_agree']}/{a['images']}.",
        "",
        f"The first requests after DeployModel, one at a time (ms): Triton direct "
        f"{', '.join(f'{x:.0f}' for x in a['first_triton_ms'])}; then Classify "
        f"{', '.join(f'{x:.0f}' for x in a['first_classify_ms'])}.",
        "",
    ]
    issues = problems(result)
    if issues:
        lines += ["**Errors:**", "", *[f"- {issue}" for issue in issues], ""]
    lines += [
        "## What is measured",
        "",
        "- Throughput: requests (= images) completed inside the measured window / its length. Latency: client "
        "side, from just before the call to its return, for those requests.",
        "- Each client thread has its own gRPC connection (Classify: a channel with a local subchannel pool; "
        "Triton direct: its own `InferenceServerClient`), so concurrency C is C independent clients.",
        "- Triton's figures come from its metrics endpoint (`nv_inference_*`), the service's from its own "
        "histograms (`visiontune_inference_*_duration_seconds`), both scraped at the start and end of each "
        "window. Client latency minus the service's whole Classify time is gRPC and the Python servicer.",
        "- The clients run in the benchmark's process on the same machine: on a small CPU they compete with the "
        "service and Triton for cores. The CPU column splits the CPU time used during the window per image: "
        "this process (the clients), the inference service process, and Triton (tritonserver plus its "
        "Python-backend stub, which runs the model).",
        "- The service handles up to `--rpc-threads` (default 64) calls at once; at concurrency 32 every "
        "request is in the service, so Triton's dynamic batcher sees them all.",
        "- The ceiling has no server, no copies and no batching delay: the model alone at its best batch size, "
        "with the torch threads a Triton instance gets, taken at the median batch time (bursts of other "
        "processes on a shared machine stay out of it; the all-batches column keeps them). On a CPU the "
        "Triton path also shares the cores with the clients and (for Classify) with decoding.",
        "",
    ]
    return "\n".join(lines)


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
    print(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    _progress(f"written to {output}")
    issues = problems(result)
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
