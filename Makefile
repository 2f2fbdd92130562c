# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment on first use and install the Debian packages kproxy drives when missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH):/usr/sbin:/sbin

.PHONY: all venv system-deps demo test lint unit bench chaos clean

all: test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

system-deps:
	@scripts/install-system-deps.sh

demo: venv system-deps
	$(BIN)/python scripts/demo.py

test: venv system-deps
	$(BIN)/pytest -ra --durations=25 tests

unit: venv
	$(BIN)/pytest -ra -m "not kernel" tests

# Cluster-scale benchmark (minutes; not part of `make test`, which runs a smoke version).
BENCH_SIZES ?= 1000x10,5000x10,10000x10,5000x50
bench: venv system-deps
	$(BIN)/python scripts/bench.py --sizes $(BENCH_SIZES) --latency --write BENCHMARKS.md

# Chaos and bad-input suite, long versions (~31 min; `make test` runs a short version of each):
# kill -9, kill -9 mid `nft -f` at 2k Services (nftables whatever CHAOS_MODE), drift, foreign
# changes repaired from nf_tables events (issue 16), API
# outage, xtables lock, 410 storm, churn at 1k Services, bad input, full disk, with traffic
# flowing; figures printed and written to $(CHAOS_OUT) (docs/RELIABILITY.md).
CHAOS_MODE ?= iptables
CHAOS_OUT ?= chaos-results.json
chaos: venv system-deps
	$(BIN)/python scripts/chaos/run.py --mode $(CHAOS_MODE) --json $(CHAOS_OUT) $(CHAOS_ARGS)

lint: venv
	$(BIN)/ruff check kproxy tests scripts
	$(BIN)/ruff format --check kproxy tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
