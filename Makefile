# qdetr developer commands. `make demo` and `make test` work on a fresh clone:
# they create .venv on first use and install qdetr with the pinned torch/torchvision.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qdetr-installed
OUT    ?= outputs/demo

.PHONY: demo test test-fast bench install clean check-floors

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default data.
demo: $(STAMP)
	$(BIN)/python -m qdetr demo --out $(OUT)

## The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Tests without the few full-size ones.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## Benchmarks (print figures; see docs/performance.md): fake-quant step time and memory on
## both workloads, then the distillation step, as medians and ranges of alternating pairs.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_fake_quant.py --pairs 9 --rss-runs 3
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_distill.py --repeats 9

## Install the declared minimum versions in a scratch venv and run a smoke subset (not part of `test`).
check-floors:
	$(PYTHON) tools/check_floors.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
