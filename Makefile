# Everything a fresh machine needs: `make test` and `make demo` create the virtual
# environment, install the CPU build of torch first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint schema bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,examples]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

schema: $(STAMP)
	$(VENV)/bin/pruneplan schema -o schemas/pruneplan.v1.schema.json

bench: $(STAMP)
	$(PY) benchmarks/apply_safetensors.py
	$(PY) benchmarks/apply_sharded.py
	$(PY) benchmarks/attributions.py
	$(PY) benchmarks/distributed_attribution.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
