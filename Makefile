# Everything a fresh clone needs: `make run` and `make test` install what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install run test gen check-gen lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

gen: $(STAMP)
	rm -rf gen && mkdir -p gen
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	find gen -mindepth 1 -type d -exec touch {}/__init__.py \;

# Fails when the committed gen/ differs from what protos/ generates.
check-gen: $(STAMP)
	$(PY) -m tests.tools.check_gen

lint: $(STAMP)
	$(VENV)/bin/ruff check metering renderer tests bench

run: $(STAMP)
	$(PY) deploy/run_local.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .data
