VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev,torch]"
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check h5dask tests benchmarks workflows
	$(VENV)/bin/ruff format --check h5dask tests benchmarks workflows

test: venv lint
	$(VENV)/bin/pytest -q

demo: venv
	$(PY) workflows/demo.py

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info demo-output
