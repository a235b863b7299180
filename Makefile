# garrison — the two commands users need are `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo test test-unit lint bench clean

setup:
	./scripts/setup.sh

demo: setup
	./scripts/demo.sh

# The whole suite: lint, then unit, privileged (root + kernel) and end-to-end tests.
test: setup lint
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) tests/unit

lint: setup
	$(VENV)/bin/ruff check garrison tests bench
	$(VENV)/bin/mypy garrison

# Each benchmark also runs alone; the datapath one needs root (namespaces, BPF).
bench: setup
	$(PY) bench/policy.py
	$(PY) bench/parsers.py
	$(PY) bench/proxy_http.py
	$(PY) bench/proxy_grpc.py
	$(PY) bench/proxy_kafka.py
	$(PY) bench/datapath.py
	$(PY) bench/observe.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
