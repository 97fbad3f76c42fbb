# syntax=docker/dockerfile:1
# The inference image: `python -m inference_service`, which starts Triton (`tritonserver`, on PATH as in NVIDIA's
# containers) as its child process and serves models through Triton's Python backend with torch.
# Build from the repository root:
#   docker build -f deploy/docker/inference.Dockerfile -t REGISTRY/visiontune-inference:TAG .
#
# Base: NVIDIA's Triton 24.10 container (Triton 2.51, CUDA 12.6, Ubuntu 22.04), pinned. The project needs Python
# 3.11 while this image's system Python is 3.10, and the Python backend's stub must be built for the interpreter
# whose torch the models import. nvidia-pytriton 0.7.0 ships Triton 2.51's stub for 3.11 (the same Triton release
# as this base), so: Ubuntu's python3.11 in a venv, the project in it, and that stub put where
# inference_service.triton.server looks first: /opt/tritonserver/python_backend_stubs/3.11/.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Writable paths only (HOME, caches): the pod's root filesystem is read-only; /var/lib/visiontune and /tmp
# are emptyDirs there.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/tritonserver/bin:$PATH \
    HOME=/tmp \
    VISIONTUNE_DATA_DIR=/var/lib/visiontune \
    VISIONTUNE_HOST=0.0.0.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 22.04's own Python 3.11 (universe); libpython3.11 is what the backend stub links against.
# DL3008 (pin apt versions) is ignored: Ubuntu's archive drops superseded versions, so an exact pin breaks the
# build within weeks; the pinned base tag fixes the release these come from.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /opt/visiontune
COPY pyproject.toml README.md ./
COPY visiontune ./visiontune
COPY trainer_service ./trainer_service
COPY inference_service ./inference_service

# The project (torch, tritonclient, ... at their pins); nvidia-pytriton --no-deps only for its 3.11 stub (its
# metadata pins numpy<2 and an older protobuf than ours, as in `make setup`).
RUN python -m pip install --no-cache-dir . \
    && python -m pip install --no-cache-dir --no-deps nvidia-pytriton==0.7.0 \
    && stub_dir=/opt/tritonserver/python_backend_stubs/3.11 \
    && mkdir -p "$stub_dir" \
    && cp "$(python -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])')/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" "$stub_dir/" \
    && python -c "from inference_service.triton.server import find_triton; print(find_triton())"

RUN groupadd --gid 10001 visiontune \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin visiontune \
    && mkdir -p /var/lib/visiontune \
    && chown 10001:10001 /var/lib/visiontune
USER 10001:10001

# gRPC InferenceService (VISIONTUNE_INFERENCE_PORT) and Prometheus /metrics (VISIONTUNE_METRICS_PORT). Triton's
# own ports (8000-8002) stay on the pod's loopback. No HEALTHCHECK: Kubernetes probes gRPC health itself.
EXPOSE 50052 9464
ENTRYPOINT ["python", "-m", "inference_service"]
