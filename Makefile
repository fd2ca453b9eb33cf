# The two commands of the README: `make demo`, `make test`. `make setup` is run by both.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup test demo bench groups-example clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "make setup: $(PY) not found (set PY=...)"; exit 2; }
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt megatron-core pytest numpy
	$(VPY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(VPY) -m mindspeed_cp.demo

bench: setup
	$(VPY) -m benchmarks.run

clean:
	rm -rf $(VENV) *.egg-info test-artifacts

groups-example: setup
	mkdir -p test-artifacts
	$(VENV)/bin/mindspeed-cp groups --world-size 16 --tp 2 --cp 8 --cp-algo hybrid_cp_algo \
	  --ulysses-degree-in-cp 2 --cp-window-size 2 --format html --output test-artifacts/groups-example.html
