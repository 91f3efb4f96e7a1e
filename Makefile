# Every target sets up what it needs: a fresh machine only needs python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LLMOS_HOME ?= $(HOME)/.llmos

.PHONY: run test setup model browser bench bench-deps clean

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

# The benchmarks' peers: llama.cpp through llama-cpp-python (compiled from source, minutes).
# Never a dependency of llmos, so `make test` and `make run` do not install it.
bench-deps: model
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install -q "llama-cpp-python==0.3.36"

bench: bench-deps
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV)
