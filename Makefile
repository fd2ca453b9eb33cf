# The two commands of the README: `make demo`, `make test`. `make setup` is run by both.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup test lint format test-compat test-megatron-lm megatron-lm-deps demo demo-megatron-lm bench bench-cli bench-peers gpu-check groups-example clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "make setup: $(PY) not found (set PY=...)"; exit 2; }
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt megatron-core pytest numpy matplotlib ruff
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: lint
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

# ruff (ruff.toml): the formatter decides line shape, the linter keeps the tree clean; `make format` applies both
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The Megatron-touching tests on megatron-core 0.12.3 ... 0.15.3 (Python 3.11 overlays) and 0.17.1 ... 0.19.2
# (a Python 3.12 venv, cached in .compat/; 0.19.2 runs Megatron's training loop from its wheel).
# COMPAT="0.12.3 0.19.2" for some releases; docs/compatibility.md.
test-compat: setup
	$(VPY) -m tests.compat $(COMPAT)

# Megatron-LM (megatron/training) is not on PyPI: point MEGATRON_LM_PATH at a core_v0.16.1 checkout.
# Its imports need a few more packages (triton only because megatron/training/initialize.py imports it;
# psutil because its checkpoint writer waits for its forked workers through it - without, --save hangs).
megatron-lm-deps: setup
	@test -n "$(MEGATRON_LM_PATH)" || { echo "set MEGATRON_LM_PATH to a Megatron-LM core_v0.16.1 checkout"; exit 2; }
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt six regex pyyaml pydantic triton psutil

test-megatron-lm: megatron-lm-deps
	MEGATRON_LM_PATH=$(MEGATRON_LM_PATH) $(VPY) -m pytest -q tests/test_megatron_lm.py tests/test_scripts.py \
	  tests/test_megatron_lm_training.py $(PYTEST_ARGS)

# real pretrain_gpt.py with CP=1 and each algorithm at CP 4 on gloo ranks: the loss table (~2 min)
demo-megatron-lm: megatron-lm-deps
	MEGATRON_LM_PATH=$(MEGATRON_LM_PATH) $(VPY) -m mindspeed_cp.tools.demo_megatron_lm

demo: setup
	$(VPY) -m mindspeed_cp.tools.demo

bench: setup
	$(VPY) -m benchmarks.run

# mindspeed-cp groups / plan at 4,096 - 1,048,576 ranks (a few minutes): benchmarks/results/cli_scale.{json,md}
bench-cli: setup
	$(VPY) -m benchmarks.cli_scale

# Peers side by side (DeepSpeed and yunchang Ulysses, PyTorch and yunchang rings, USP; issue 16): own venv in .peers/ (built once, ~1 GB),
# results in benchmarks/results/peers.md / .json. QUICK=1 for tiny sizes.
bench-peers: setup
	$(VPY) -m benchmarks.peers $(if $(QUICK),--quick,)

# One prepared script for a machine with a GPU (no setup: it runs with that machine's torch, nothing downloaded).
# Without a GPU it says so and exits 0. Writes benchmarks/results/gpu.md.
GPU_PY ?= $(shell test -x $(VPY) && echo $(VPY) || echo python3)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) *.egg-info test-artifacts

groups-example: setup
	mkdir -p test-artifacts
	$(VENV)/bin/mindspeed-cp groups --world-size 16 --tp 2 --cp 8 --cp-algo hybrid_cp_algo \
	  --ulysses-degree-in-cp 2 --cp-window-size 2 --format html --output test-artifacts/groups-example.html
