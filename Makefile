# One command each (see README): `make demo` sets up and runs the main job, `make test` the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
JEI     = $(VENV)/bin/jei-edge
DEMO   ?= runs/demo
SERVE_VENV ?= .venv-serve
SERVE_PY    = $(SERVE_VENV)/bin/python

.PHONY: setup setup-serve test test-all demo clean

$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

# The serving environment (docs/serving.md): numpy < 2 for nvidia-pytriton, no torch; jei-edge without deps.
$(SERVE_VENV)/.installed: setup.py requirements/serve.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(SERVE_PY) -m pip install -q --disable-pip-version-check -r requirements/serve.txt
	$(SERVE_PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

setup-serve: $(SERVE_VENV)/.installed

test: setup setup-serve  ## fast test suite (what CI runs); the Triton serving tests run in .venv-serve
	$(PY) -m pytest -m "not slow and not serve"
	$(SERVE_PY) -m pytest tests/serve -m "serve and not slow"

test-all: setup setup-serve  ## include slow tests
	$(PY) -m pytest -m "not serve"
	$(SERVE_PY) -m pytest tests/serve -m serve

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
	rm -rf $(VENV) $(SERVE_VENV) runs build dist *.egg-info
