# Every target sets up what it needs: a fresh machine only needs python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LLMOS_HOME ?= $(HOME)/.llmos

.PHONY: run test setup model browser bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 explicitly: its CPU build lies on this disk; an unpinned torch pulls CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

model: $(STAMP)
	$(BIN)/llmos pull smollm2-135m

# The HTTP server on the default model; it prints its URL, an API key and a curl example.
run: model
	$(BIN)/llmos serve

# The dashboard's tests drive the OS's Chromium through Playwright (Playwright's own browser
# download cannot reach its server from here); installed from the Debian packages when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

test: model browser
	$(BIN)/python -m pytest -q tests

bench: model
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV)
