# Everything a fresh machine needs: `make test` and `make demo` create the virtual
# environment, install torch and torchvision first, pinned to the builds these machines hold on
# local disk (a bare `torch` requirement would download a multi-GB CUDA build, and PyPI's
# torchvision does not import beside another torch), then the package with its extras
# (timm and transformers for the tests on real model code).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test test-core coverage demo docs lint schema bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,examples,models]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m real tests/test_real_models.py tests/test_hf_real.py

# the core suite alone (no torchvision/timm models): what to run while developing
test-core: $(STAMP)
	$(PY) -m pytest -q

coverage: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/coverage.py -o docs/coverage.md

demo: $(STAMP)
	$(PY) examples/demo.py

# regenerate every committed number in docs/ (3 seeds each; the README quotes these files):
# docs/demo_results.txt + accuracy_vs_ratio.png, docs/demo_quick.json (what the tests compare a
# fresh quick run with), docs/criteria.md
docs: $(STAMP)
	$(PY) examples/demo.py --out out/demo --docs docs
	$(PY) examples/demo.py --quick --out out/demo_quick --docs docs
	$(PY) benchmarks/criteria.py --seeds 3 --out docs/criteria.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

schema: $(STAMP)
	$(VENV)/bin/pruneplan schema --force -o schemas/pruneplan.v3.schema.json

bench: $(STAMP)
	$(PY) benchmarks/apply_safetensors.py
	$(PY) benchmarks/apply_sharded.py
	$(PY) benchmarks/attributions.py
	$(PY) benchmarks/distributed_attribution.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
