# Realtime Web, Hands-On. Two commands on a fresh machine:
#   make lab    set up and open the course in JupyterLab
#   make test   set up and run every test (unit, integration, browser, notebooks)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian's Chromium: Playwright drives it (we never download a browser of Playwright's own).
# Exported: chatlib.browser, the tests and the notebooks' kernels use the same binary.
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Jupyter refuses to run as root (containers, some cloud VMs) unless told it may.
LAB_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: setup lab test torture lint chromium servers iproute2 cluster bench notebooks clean

setup: $(STAMP)

# An editable install skips the wheel's data-files, so chatlib.save_hook (saved notebooks
# keep no widget view that a new kernel cannot draw) gets the wheel's server config by hand:
# `jupyter server extension enable` refuses an extension no config lists yet (jupyter_server 2.21).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	install -D -m 644 jupyter-config/chatlib.json $(VENV)/etc/jupyter/jupyter_server_config.d/chatlib.json
	touch $@

lab: setup
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(LAB_ROOT)

chromium:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# Debian's redis-server and nginx, for the scale-out tests, chapter 9 and `make cluster`;
# the tests start their own instances as ordinary processes (nothing runs as a service).
servers:
	@{ command -v redis-server && { command -v nginx || test -x /usr/sbin/nginx; }; } \
	  >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server nginx; }

# Debian's iproute2 (`ip`), for the torture suite's network namespaces (vanished peers:
# tests/torture/netns.py); those tests skip, saying why, where namespaces cannot be made.
iproute2:
	@command -v ip >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq iproute2; }

# Redis + 3 chat processes + nginx on http://127.0.0.1:8080/ (Ctrl+C stops them all).
cluster: setup servers
	$(BIN)/python -m chatlib.cluster

lint: setup
	$(BIN)/ruff check .

# tests/ (unit, integration, kernel, browser, proxy, JupyterLab) and every notebook under nbval;
# then the notebooks once more with the browser hidden, as on Binder/JupyterHub (no Chromium),
# and in Colab mode (tests/colab stands in for google.colab: no chat page link, the panel and
# the Python clients only); then the torture suite (its own pytest run: it prints its figures).
# No port memory in test runs (chatlib.server.notebook_port), even when started from a
# notebook, whose JPY_SESSION_NAME its kernels would inherit.
test: export CHATLIB_NO_PORT_REUSE = 1
test: setup chromium servers lint
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=300 --ignore=tests/torture \
	  tests notebooks
	CHATLIB_NO_BROWSER=1 PYTHONPATH=$(CURDIR)/tests/colab \
	  $(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=300 notebooks
	$(MAKE) --no-print-directory torture

# Fuzz, churn, kill -9, stuck clients and exhaustion against real server processes
# (tests/torture/, about 3 minutes on 2 cores); TORTURE_SEED=N reproduces another run.
torture: setup iproute2
	$(BIN)/python -m pytest -p no:cacheprovider -rsxX tests/torture

# Re-execute every notebook in place, so the outputs committed to git come from a clean run;
# then clean_outputs.py replaces what only that run's kernel could show (ports, widget views).
notebooks: setup
	cd notebooks && for nb in [0-9]*.ipynb; do \
	  ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.record_timing=False "$$nb" || exit 1; \
	  ../$(BIN)/python clean_outputs.py "$$nb" || exit 1; done

# The fan-out tables' third row, a Node.js `ws` server (bench/node/), needs node and npm:
# npm ci installs the locked `ws`; without them fanout.py says so and skips that row.
# make bench ARGS=--quick (< 2 min), ARGS='--sections ws-closed,ws-open --reps 7', ...
bench: setup
	@if command -v node >/dev/null && command -v npm >/dev/null; then \
	  npm ci --prefix bench/node --no-audit --no-fund --loglevel=error; \
	else echo "node/npm not found: the Node.js ws reference row of the fan-out tables is skipped"; fi
	$(BIN)/python bench/fanout.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis tests/artifacts bench/results
