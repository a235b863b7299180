# garrison — the two commands users need are `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup setup-runtime demo demo-containers demo-cluster test test-unit lint bench clean install uninstall

setup:
	./scripts/setup.sh

# What garrison and its demo need, without the test and lint tools (setup installs those too).
setup-runtime:
	GARRISON_SETUP=runtime ./scripts/setup.sh

demo: setup-runtime
	./scripts/demo.sh

# The garrison command on the PATH (a link in /usr/local/bin) and the agent's systemd unit;
# uninstall removes those and what the agent left in the kernel (docs/operating.md).
install: setup
	./scripts/install.sh

uninstall:
	./scripts/uninstall.sh

# The Star Wars scenario with podman containers on a garrison-chained CNI network.
demo-containers: setup
	./scripts/demo-containers.sh

# The Star Wars scenario on three nodes sharing etcd (network namespaces, docs/cluster.md#demo);
# setup installs etcd (Debian's etcd-server).
demo-cluster: setup
	./scripts/demo-cluster.sh

# The whole suite: lint, then unit, privileged (root + kernel) and end-to-end tests, all on
# the mypyc-compiled modules users run; then the unit tests again on the pure-Python source,
# which runs wherever the compiled build is missing or stale (garrison/native.py).
# The privileged and end-to-end tests run one at a time (fixed namespace names and
# addresses); the unit tests touch nothing shared and spread over the cores (pytest-xdist).
UNIT_PARALLEL := -n auto --maxprocesses=4 --dist worksteal
test: setup lint
	$(PYTEST) tests --ignore=tests/unit
	$(PYTEST) $(UNIT_PARALLEL) tests/unit
	GARRISON_PURE=1 $(PYTEST) -q $(UNIT_PARALLEL) tests/unit

test-unit: setup
	$(PYTEST) $(UNIT_PARALLEL) tests/unit

lint: setup
	$(VENV)/bin/ruff check garrison tests bench
	$(VENV)/bin/mypy garrison
	$(PYTEST) -q -p no:cacheprovider tests/unit/test_layers.py

# Each benchmark also runs alone; the datapath and cluster ones need root (namespaces, BPF).
bench: setup
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/policy.py
	$(PY) bench/parsers.py
	$(PY) bench/proxy_http.py
	$(PY) bench/proxy_latency.py
	$(PY) bench/proxy_saturation.py
	$(PY) bench/proxy_agent.py
	$(PY) bench/proxy_grpc.py
	$(PY) bench/proxy_kafka.py
	$(PY) bench/datapath.py
	$(PY) bench/observe.py
	$(PY) bench/probe_h2codec.py
	$(PY) bench/cluster.py

clean:
	-$(PY) scripts/compile.py --remove
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
