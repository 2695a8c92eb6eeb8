# One command each (see README): `make demo` sets up and runs the main job, `make test` the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
JEI     = $(VENV)/bin/jei-edge
DEMO   ?= runs/demo

.PHONY: setup test test-all demo clean

$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

test: setup            ## fast test suite (what CI runs)
	$(PY) -m pytest

test-all: setup        ## include slow tests
	$(PY) -m pytest -m "not gpu or gpu"

demo: setup            ## train a small JEI-DNN on digits, evaluate, build the CPU bundle, verify, inspect, run and profile it
	$(JEI) train --data digits --lambda 0.1 -o $(DEMO)/model.pt
	$(JEI) eval $(DEMO)/model.pt --data digits
	$(JEI) build $(DEMO)/model.pt --target cpu -o $(DEMO)/model.jei --force
	$(JEI) verify $(DEMO)/model.jei
	$(JEI) inspect $(DEMO)/model.jei
	$(PY) -c "from jei_edge.data import load_data; import numpy as np; d = load_data('digits'); np.savez('$(DEMO)/test.npz', x=d.raw_test, y=d.test.y)"
	$(JEI) run $(DEMO)/model.jei $(DEMO)/test.npz --show 8
	$(JEI) run $(DEMO)/model.jei $(DEMO)/test.npz --mode full --show 0
	$(JEI) profile $(DEMO)/model.jei $(DEMO)/test.npz -o $(DEMO)/profile

clean:
	rm -rf $(VENV) runs build dist *.egg-info
