# derms — `make demo` and `make test` work on a fresh machine (Python >= 3.11 on PATH).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo test test-all bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

## demo: the live system (derms serve + control loop + IEEE 2030.5, derms sim on IEEE 123:
## an EV-charging surge overloads the head section and the DERMS clears it; SQLite,
## ~1.5 min), then a one-week 15-min QSTS study of
## IEEE 123 with 30 % PV
demo: $(VENV)/.installed
	$(BIN)/derms demo --out $(DEMO_OUT)
	$(BIN)/derms study ieee123 --days 7 --step 15min --pv-penetration 0.3 --out $(DEMO_OUT)/study --force

## test: the CI suite (no slow studies)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

## test-all: everything, slow studies included
test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m ""

## bench: performance tables (see bench/README.md)
bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_qsts.py
	$(BIN)/python bench/bench_linear.py
	$(BIN)/python bench/bench_state_estimation.py
	$(BIN)/python bench/bench_store.py
	$(BIN)/python bench/bench_ingest.py --seconds 60 --devices 15000
	$(BIN)/python bench/bench_forecast.py all
	$(BIN)/python bench/bench_constraint_forecast.py --start 2012-06-01 --days 30
	$(BIN)/python bench/bench_dispatch.py --repeats 3 --days 3
	$(BIN)/python bench/bench_hosting_capacity.py
	$(BIN)/python bench/bench_hosting_capacity.py --feeders ieee8500 --kinds pv --method fast-groups --sample 120
	$(BIN)/python bench/bench_envelopes.py
	$(BIN)/python bench/bench_interconnection.py
	$(BIN)/python bench/bench_ieee2030_5.py --clients 1000 --seconds 120

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
