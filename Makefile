# The two commands a newcomer types: `make run` and `make test` (README.md).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

# No telemetry anywhere, and Prefect state (the local ephemeral API's database) inside the project.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
# Bytecode is compiled on first import, not at install: pip would compile all ~24k modules of torch,
# transformers and the rest (about 2 minutes on 2 cores) where a run imports a fraction of them.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test install clean serve system-packages

install: $(VENV)/.installed

# uv installs what pip resolves (the same versions, checked) in about 40 s where pip takes about 180 s
# (BENCHMARKS.md). It does not read pip's configuration, so it is handed pip's extra indexes and wheel
# folders (where this machine keeps torch), and like pip it takes the best version from any index.
PIP_EXTRA_INDEXES := $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
PIP_FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_SOURCES := --index-strategy unsafe-best-match $(foreach u,$(PIP_EXTRA_INDEXES),--extra-index-url $(u)) \
	$(foreach f,$(PIP_FIND_LINKS),--find-links $(f))

# Reinstall when the dependencies change. pip's notes about this machine's local indexes are noise.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/uv pip install -q --python $(BIN)/python $(UV_SOURCES) -e '.[test]'
	touch $@

run: install
	$(BIN)/scoft sample --out data/sample
	$(BIN)/scoft run

# The whole loop on this machine: server, pools, deployments, recovery automations, one worker per
# pool (deployments/serve.sh); the UI address is printed; Ctrl-C stops everything.
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" deployments/serve.sh

# The tests drive the review app in Debian's chromium and run its store on a real PostgreSQL server. Where
# either is missing, root with apt installs it; anyone else is told the one command to run.
SYSTEM_PACKAGES := chromium postgresql
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done | xargs); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's $$missing (the browser and PostgreSQL tests need them)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "the tests need Debian's $$missing: run  sudo apt-get install --no-install-recommends $$missing" >&2; \
		exit 1; \
	fi

# Two pytest-xdist workers, each test module whole on one of them (its module fixtures built once): much
# of the suite waits on stage processes and servers, and one stream left a core idle (BENCHMARKS.md).
test: install system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

clean:
	rm -rf data models reports lineage .prefect dvc-remote
