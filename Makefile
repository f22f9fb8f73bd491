# Two commands on a fresh machine: `make run` serves a model that works offline, `make test` runs
# every test. Both create the virtual environment and fetch the offline model when absent.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/smollm2-135m-instruct
TEST_MODEL_DIR ?= models/random-distilgpt2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint unit bench clean haproxy

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) tools/fetch_model.py $(MODEL_DIR)

$(TEST_MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) tools/make_test_model.py $(TEST_MODEL_DIR)

run: $(VENV)/.installed $(MODEL_DIR)/config.json
	@if [ -z "$$API_KEY" ]; then \
		echo "WARNING: API_KEY is not set; using the demo key gpp-llm-service-secret. Set API_KEY for real use." >&2; \
	fi
	API_KEY="$${API_KEY:-gpp-llm-service-secret}" MODEL_NAME="$${MODEL_NAME:-$(MODEL_DIR)}" \
		HOST="$(HOST)" PORT="$(PORT)" $(PY) server.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile deploy/model.Dockerfile
	@if command -v docker-compose >/dev/null; then \
		docker-compose -f docker-compose.yml config --quiet && echo "docker-compose.yml is valid"; \
		API_KEY=validate-only docker-compose -f deploy/docker-compose.replicas.yml config --quiet \
			&& echo "deploy/docker-compose.replicas.yml is valid"; \
	else \
		echo "docker-compose not installed: docker-compose.yml NOT validated (.ci/run installs it)"; \
	fi

# tests/test_replicas.py runs Debian's haproxy in front of the replicas.
haproxy:
	@command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy >/dev/null; } \
		|| { echo "tests/test_replicas.py needs haproxy: install Debian's haproxy package (as root)" >&2; exit 1; }

unit: $(VENV)/.installed
	$(PY) -m pytest -q -m "not integration and not e2e"

test: lint haproxy $(MODEL_DIR)/config.json $(TEST_MODEL_DIR)/config.json
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
