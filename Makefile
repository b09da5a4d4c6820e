# enclave: `make setup` once, then `make test`; `make plan` / `make lab` show the prod stack offline.
# Works on a fresh Debian/Ubuntu machine; as root it also installs the system packages the lab needs.
SHELL := /bin/bash
VENV := .venv
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
ENCLAVE := $(VENV)/bin/enclave
# The stack `make plan` / `make lab` show: the CLI's default too (enclave/stackargs.py DEFAULT_STACK)
STACK ?= prod
# enclave needs Python 3.11+; on a machine whose python3 is older: `make setup PYTHON=python3.11`
PYTHON ?= python3
APT_PACKAGES := python3 python3-venv iproute2 iptables ipset nftables openssh-server openssh-client graphviz librsvg2-bin procps
# Only `make bench` needs these (a load generator and a small web server for the data-plane figures); RUNLEVEL=1
# keeps the package from starting nginx on the machine itself: the benchmark runs its own inside namespaces.
BENCH_APT_PACKAGES := wrk nginx-light
BENCH_ARGS ?=
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: setup python-check apt requirements test typecheck unit fuzz test-faults-long plan lab bench bench-setup clean

setup: python-check apt $(VENV)/.synced

# Refuse an old Python before building anything (uv would fail later on requires-python, naming no fix).
python-check:
	@version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || \
	  { echo "make setup: $(PYTHON) not found; install Python 3.11 or newer (apt-get install python3 python3-venv)"; exit 1; }; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { echo "make setup: enclave needs Python 3.11 or newer, $(PYTHON) is $$version. On Ubuntu 22.04: \
	apt-get install python3.11 python3.11-venv, then rm -rf $(VENV) && make setup PYTHON=python3.11"; exit 1; }

apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping apt packages ($(APT_PACKAGES)); the lab needs them"; fi

# The venv comes from uv.lock exactly (--frozen); uv itself is bootstrapped into the venv with pip.
$(VENV)/.synced: pyproject.toml uv.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(VENV)/bin/pip install -q "uv==$(UV_VERSION)"
	$(UV) sync --frozen --inexact --python $(VENV)/bin/python -q
	@touch $@

# What Pulumi's own installer reads (`pulumi install`, and `pulumi up` in a fresh clone or Pulumi Deployments:
# Pulumi.yaml's `toolchain: pip` runs `pip install -r requirements.txt` into .venv): uv.lock's runtime packages,
# pinned with their hashes. tests/unit/test_requirements.py fails when it differs from uv.lock; `make requirements`.
requirements: $(VENV)/.synced
	$(UV) export --frozen --no-dev --no-emit-project -q -o requirements.txt

typecheck: setup
	$(VENV)/bin/mypy

# The tests that need no root (tests/unit: pure logic, Pulumi mocks, fakes), on two workers.
unit: setup
	$(VENV)/bin/pytest -q -n 2 tests/unit

# The test command (CI runs it): type-check the program against the Pulumi SDKs, then both tiers, tests/unit and
# tests/lab (root: namespaces, sshd, netfilter). Three workers, one test file each (module-scoped labs stay
# shared): most lab tests wait on rollback windows and SSH rather than compute. Measured on 2 cores: 4 min 17 s
# idle (678 tests), 5 min 56 s and 6 min 25 s in two runs in a row with two CPU hogs beside it.
test: typecheck
	$(VENV)/bin/pytest -q -n 3 --dist loadfile tests

# The property-based test of hostile input (tests/unit/test_fuzz.py) with a longer budget than `make test` gives it
# (60 examples there); FUZZ_EXAMPLES=20000 for a night.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	ENCLAVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q tests/unit/test_fuzz.py --hypothesis-show-statistics

# Every fault-injection step of tests/lab/test_lab_faults.py (kill -9 and reboot at each step of push, confirm and
# restore); `make test` runs a representative subset. Root, about 4 minutes on 2 shared cores.
test-faults-long: setup
	ENCLAVE_FAULTS_LONG=1 $(VENV)/bin/pytest -q tests/lab/test_lab_faults.py

plan: setup
	$(ENCLAVE) plan --stack $(STACK)

lab: setup
	$(ENCLAVE) lab check --stack $(STACK)

bench-setup: setup
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping apt packages ($(BENCH_APT_PACKAGES)); the data-plane benchmark needs them"; fi

# Measures plan cost, the data plane, apply cost and the mocked program (root, a few minutes) and rewrites
# docs/benchmarks.md. `make bench BENCH_ARGS=--quick` for a short run; BENCH_ARGS="plan program" for parts.
bench: bench-setup
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache
