# Everything a fresh clone needs: `make run` and `make test` install what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install run test gen lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	sh deploy/tools/ensure_promtool.sh
	touch $(STAMP)

GEN_DIR ?= gen
gen: $(STAMP)
	rm -rf $(GEN_DIR) && mkdir -p $(GEN_DIR)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTOS)
	find $(GEN_DIR) -mindepth 1 -type d -exec touch {}/__init__.py \;

lint: $(STAMP)
	$(VENV)/bin/ruff check metering renderer tests bench deploy

run: $(STAMP)
	$(PY) deploy/run_local.py

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	sh bench/ensure_pgbench.sh
	$(PY) -m bench

clean:
	rm -rf $(VENV) .data
