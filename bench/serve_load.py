"""The serving benchmark's load generator: C client threads, each with its own connection, calling back to back
through a warm-up and then a measured window (bench/serve.py's docstring has the method), and its two clients:
Classify through our API, and tritonclient straight to Triton."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
from inference_service.triton.server import TRITON_DATATYPES
from visiontune.v1 import inference_service_pb2 as pb
from visiontune.v1 import inference_service_pb2_grpc

from bench.serve_accounting import cpu_seconds, inside, scrape
from bench.serve_model import INPUT_NAME, OUTPUT_NAME

CLASSIFY = "Classify"
TRITON = "Triton direct"
MAX_MESSAGE = 64 * 1024 * 1024
# One TCP connection per client thread: without a local subchannel pool, gRPC Python shares one connection
# among every channel of a process to the same target.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

Call = Callable[[int], None]  # one request for image i; raises on failure


def triton_input(batch: np.ndarray[Any, Any]) -> triton_grpc.InferInput:
    """`batch` as the model's input tensor, in its own dtype (uint8 pixels or float32), as the service sends it."""
    tensor = triton_grpc.InferInput(INPUT_NAME, list(batch.shape), TRITON_DATATYPES[batch.dtype])
    tensor.set_data_from_numpy(batch)
    return tensor


def payload_bytes_per_image(batch: np.ndarray[Any, Any]) -> int:
    """The input bytes one image puts in a KServe request (raw_input_contents: the tensor's bytes, as
    `set_data_from_numpy` serialises them)."""
    return len(batch[:1].tobytes())


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
    warmup: float,
    seconds: float,
    service_pid: int,
    metrics_urls: Sequence[str],
) -> Point:
    """`concurrency` threads, each with its own client from `connect`, calling back to back for `warmup` s,
    then `seconds` s measured; CPU and server metrics read at the window's start and end."""
    logs = [_ThreadLog() for _ in range(concurrency)]
    clock: dict[str, float] = {}

    def set_clock() -> None:  # run by the last thread to reach the barrier, before any is released
        clock["window_start"] = time.perf_counter() + warmup
        clock["window_end"] = clock["window_start"] + seconds

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
        seconds=seconds,
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
            tensor = triton_input(tensors[i : i + 1])
            result = client.infer(triton_model, [tensor], outputs=output, client_timeout=60)
            logits = result.as_numpy(OUTPUT_NAME)
            if logits is None or logits.shape[0] != 1:
                raise RuntimeError(f"Triton answered {None if logits is None else logits.shape} for one image")

        return call, client.close

    return connect
