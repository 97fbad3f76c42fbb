"""`python -m inference_service`: the InferenceService gRPC server, its Triton server and its metrics.

Start-up: check S3 (shared bootstrap), open the prediction store (feedback's database, shared by every
replica), start Triton on its own ports, open the Prometheus endpoint, serve gRPC, and restore the deployments
recorded in the bucket in the background (ListDeployments shows them LOADING until Triton has them ready).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from prometheus_client import start_http_server
from visiontune.auth import TokenRegistry
from visiontune.bootstrap import StartupError, run_service
from visiontune.database import DatabaseError
from visiontune.jpeg_on_device import DeviceJpegDecoder
from visiontune.preprocessing import MAX_IMAGE_PIXELS
from visiontune.server import ServiceBinding
from visiontune.settings import DEFAULT_INFERENCE_PORT, FEEDBACK_DATABASE_URL_ENV, ServerSettings
from visiontune.store import ArtifactStore
from visiontune.v1 import inference_service_pb2, inference_service_pb2_grpc

from inference_service.engine import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES, InferenceEngine, Limits
from inference_service.metrics import DEFAULT_RATE_WINDOW, InferenceMetrics
from inference_service.placement import ALL_GPUS, DEFAULT_PRECISION, Placement, Precision, placement_for
from inference_service.predictions.schema import SchemaError
from inference_service.predictions.store import (
    DEFAULT_CAPACITY,
    DEFAULT_RETENTION_HOURS,
    Janitor,
    SqlPredictionStore,
    database_url_for,
)
from inference_service.servicer import InferenceServicer
from inference_service.triton.server import TritonError, TritonModels, TritonPorts, TritonServer, find_triton
from inference_service.triton.supervisor import TritonSupervisor

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_METRICS_PORT = 9464  # the port OpenTelemetry/Prometheus exporters conventionally use
DEFAULT_TRITON_PORTS = (8001, 8000, 8002)  # gRPC, HTTP, metrics: Triton's own defaults
PREDICTIONS_FILE = Path("inference") / "predictions.sqlite3"  # under --data-dir, without --feedback-database-url

log = logging.getLogger("inference_service")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(f"VISIONTUNE_{name}", str(default)))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(f"VISIONTUNE_{name}", str(default)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("METRICS_PORT", DEFAULT_METRICS_PORT),
        help="Prometheus /metrics port, on --host [VISIONTUNE_METRICS_PORT]",
    )
    serving.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=os.environ.get("VISIONTUNE_DEVICE", "auto"),
        help="where Triton runs models: auto = cuda when a GPU is visible [VISIONTUNE_DEVICE]",
    )
    serving.add_argument(
        "--gpus",
        default=os.environ.get("VISIONTUNE_GPUS", ALL_GPUS),
        help="on cuda: the GPUs every deployment's instances go to, comma-separated indices (each gets "
        f"instance_count instances); default {ALL_GPUS!r}, every GPU Triton sees [VISIONTUNE_GPUS]",
    )
    serving.add_argument(
        "--gpu-precision",
        choices=[p.value for p in Precision],
        default=os.environ.get("VISIONTUNE_GPU_PRECISION", DEFAULT_PRECISION.value),
        help=f"on cuda: the dtype models run in, with channels_last inputs below fp32 (default "
        f"{DEFAULT_PRECISION}); the CPU always runs fp32 [VISIONTUNE_GPU_PRECISION]",
    )
    serving.add_argument(
        "--max-images",
        type=int,
        default=_env_int("MAX_IMAGES", DEFAULT_MAX_IMAGES),
        help=f"images per Classify request (default {DEFAULT_MAX_IMAGES})",
    )
    serving.add_argument(
        "--max-image-bytes",
        type=int,
        default=_env_int("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES),
        help="encoded bytes per image (default 16 MiB)",
    )
    serving.add_argument(
        "--max-image-pixels",
        type=int,
        default=_env_int("MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS),
        help="decoded pixels per image; more is refused as a decompression bomb (default 64 Mi)",
    )
    serving.add_argument(
        "--gpu-jpeg-min-pixels",
        type=int,
        default=_env_int("GPU_JPEG_MIN_PIXELS", 0),
        help="decode RGB/grey JPEGs of at least this many pixels on the GPU (nvJPEG), the rest on the CPU; "
        "0 = every image on the CPU (default); needs CUDA [VISIONTUNE_GPU_JPEG_MIN_PIXELS]",
    )
    feedback = parser.add_argument_group("feedback")
    feedback.add_argument(
        "--feedback-database-url",
        default=os.environ.get(FEEDBACK_DATABASE_URL_ENV) or None,
        help="the prediction store, shared by every replica: postgresql://user:password@host:port/db, or "
        f"sqlite:///path (default: {PREDICTIONS_FILE} under --data-dir) [{FEEDBACK_DATABASE_URL_ENV}]",
    )
    feedback.add_argument(
        "--feedback-retention-hours",
        type=float,
        default=_env_float("FEEDBACK_RETENTION_HOURS", DEFAULT_RETENTION_HOURS),
        help=f"predictions older than this are deleted (default {DEFAULT_RETENTION_HOURS:g}) "
        "[VISIONTUNE_FEEDBACK_RETENTION_HOURS]",
    )
    feedback.add_argument(
        "--feedback-capacity",
        type=int,
        default=_env_int("FEEDBACK_CAPACITY", DEFAULT_CAPACITY),
        help=f"requests the prediction store keeps, all replicas together; the oldest beyond are deleted "
        f"(default {DEFAULT_CAPACITY}) [VISIONTUNE_FEEDBACK_CAPACITY]",
    )
    serving.add_argument(
        "--fp-rate-window",
        type=int,
        default=_env_int("FP_RATE_WINDOW", DEFAULT_RATE_WINDOW),
        help="unknown-class reports the rolling false-positive rate is over (default 100)",
    )
    triton = parser.add_argument_group("Triton")
    grpc_port, http_port, metrics_port = DEFAULT_TRITON_PORTS
    triton.add_argument(
        "--triton-binary",
        default=os.environ.get("VISIONTUNE_TRITON_BINARY"),
        help="tritonserver to run (default: on PATH, else nvidia-pytriton's) [VISIONTUNE_TRITON_BINARY]",
    )
    triton.add_argument(
        "--triton-address",
        default=os.environ.get("VISIONTUNE_TRITON_ADDRESS", "127.0.0.1"),
        help="loopback address Triton's gRPC and HTTP endpoints (its model-control API) listen on; any other "
        "address is refused [VISIONTUNE_TRITON_ADDRESS]",
    )
    triton.add_argument(
        "--triton-metrics-address",
        default=os.environ.get("VISIONTUNE_TRITON_METRICS_ADDRESS", "127.0.0.1"),
        help="address Triton's Prometheus metrics listen on: 0.0.0.0 lets Prometheus scrape them too "
        "[VISIONTUNE_TRITON_METRICS_ADDRESS]",
    )
    triton.add_argument("--triton-grpc-port", type=int, default=_env_int("TRITON_GRPC_PORT", grpc_port))
    triton.add_argument("--triton-http-port", type=int, default=_env_int("TRITON_HTTP_PORT", http_port))
    triton.add_argument("--triton-metrics-port", type=int, default=_env_int("TRITON_METRICS_PORT", metrics_port))
    triton.add_argument("--triton-startup-timeout", type=float, default=120.0, help="seconds (default 120)")
    triton.add_argument(
        "--triton-shared-memory-min-bytes",
        type=int,
        default=_env_int("TRITON_SHARED_MEMORY_MIN_BYTES", 0),
        help="batches of at least this many input bytes reach Triton through system shared memory (/dev/shm) "
        "instead of inline in gRPC messages; 0 (default) = never. Only for a Triton that shares this host's "
        "/dev/shm; one that cannot use it is warned about once and batches go inline "
        "[VISIONTUNE_TRITON_SHARED_MEMORY_MIN_BYTES]",
    )


def placement(args: argparse.Namespace) -> Placement:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda, but torch sees no CUDA device")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        return placement_for(args.device, args.gpus, args.gpu_precision, visible)
    except ValueError as err:
        raise StartupError(str(err)) from err


def jpeg_decoder(args: argparse.Namespace) -> DeviceJpegDecoder | None:
    """--gpu-jpeg-min-pixels as a decoder on the first GPU torch sees; StartupError without CUDA (the flag asks for
    GPU decoding, and silently decoding on the CPU would hide that it is not happening)."""
    if args.gpu_jpeg_min_pixels <= 0:
        return None
    if not torch.cuda.is_available():
        raise StartupError("--gpu-jpeg-min-pixels is set, but torch sees no CUDA device to decode JPEGs on")
    return DeviceJpegDecoder(torch.device("cuda"), args.gpu_jpeg_min_pixels)


def open_predictions(settings: ServerSettings, args: argparse.Namespace) -> SqlPredictionStore:
    """The prediction store of --feedback-database-url; StartupError (one line, naming the host) if unusable."""
    url = args.feedback_database_url or database_url_for(settings.data_dir / PREDICTIONS_FILE)
    try:
        predictions = SqlPredictionStore(
            url, capacity=args.feedback_capacity, retention=timedelta(hours=args.feedback_retention_hours)
        )
    except (DatabaseError, SchemaError) as err:
        raise StartupError(f"{err} (--feedback-database-url)") from err
    except ValueError as err:  # a capacity or retention out of range
        raise StartupError(f"--feedback-capacity / --feedback-retention-hours: {err}") from err
    except OSError as err:  # the SQLite file's directory cannot be made
        raise StartupError(f"cannot create the prediction database {url}: {err}") from err
    log.info(
        "predictions for feedback in %s: %g h, at most %d requests",
        predictions.endpoint,
        args.feedback_retention_hours,
        args.feedback_capacity,
    )
    return predictions


def build(
    settings: ServerSettings, store: ArtifactStore, args: argparse.Namespace, registry: TokenRegistry | None = None
) -> tuple[list[ServiceBinding], Callable[[], None]]:
    where = placement(args)
    decoder = jpeg_decoder(args)
    if args.triton_shared_memory_min_bytes < 0:
        raise StartupError(
            f"--triton-shared-memory-min-bytes must be 0 (off) or more, not {args.triton_shared_memory_min_bytes}"
        )
    # First: a database it cannot use stops the service before Triton starts.
    predictions = open_predictions(settings, args)
    workdir = settings.data_dir / "inference"
    # Deployments come back from their records in the bucket; a model repository left by an earlier run
    # would only be stale.
    shutil.rmtree(workdir / "triton" / "models", ignore_errors=True)
    try:
        ports = TritonPorts(
            grpc=args.triton_grpc_port,
            http=args.triton_http_port,
            metrics=args.triton_metrics_port,
            address=args.triton_address,
            metrics_address=args.triton_metrics_address,
        )
    except ValueError as err:
        predictions.close()
        raise StartupError(f"{err} (--triton-address)") from err
    try:
        triton = TritonServer(
            find_triton(args.triton_binary), ports, workdir / "triton", startup_timeout=args.triton_startup_timeout
        )
        triton.start()
    except TritonError as err:
        predictions.close()
        raise StartupError(str(err).splitlines()[0] + f" (log: {workdir / 'triton' / 'tritonserver.log'})") from err

    metrics = InferenceMetrics(rate_window=args.fp_rate_window)
    try:
        metrics_server, _ = start_http_server(args.metrics_port, addr=settings.host, registry=metrics.registry)
    except OSError as err:
        triton.stop()
        predictions.close()
        raise StartupError(f"metrics port {settings.host}:{args.metrics_port}: {err}") from err
    log.info("metrics on http://%s:%d/metrics", settings.host, metrics_server.server_port)

    models = TritonModels(ports.grpc_url, args.triton_shared_memory_min_bytes or None)
    if models.shared_memory_min_bytes is not None:
        log.info(
            "batches of %d bytes or more go to Triton through system shared memory", models.shared_memory_min_bytes
        )
    engine = InferenceEngine(
        store,
        models,
        workdir,
        metrics,
        predictions,
        placement=where,
        limits=Limits(
            max_images=args.max_images, max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels
        ),
        jpeg_decoder=decoder,
    )
    threading.Thread(target=engine.restore, name="restore-deployments", daemon=True).start()
    janitor = Janitor(predictions)
    janitor.start()
    supervisor = TritonSupervisor(triton, engine)
    supervisor.start()

    servicer = InferenceServicer(engine, registry=registry)
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    )

    def close() -> None:
        supervisor.stop()
        janitor.stop()
        engine.close()
        predictions.close()
        models.close()
        metrics_server.shutdown()
        metrics_server.server_close()
        triton.stop()

    return [binding], close


def main() -> int:
    return run_service(
        service="inference_service",
        description="VisionTune InferenceService: model deployments on Triton, classification, feedback.",
        default_port=DEFAULT_INFERENCE_PORT,
        port_env="INFERENCE_PORT",
        factory=build,
        add_arguments=add_arguments,
    )


if __name__ == "__main__":
    sys.exit(main())
