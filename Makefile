# make demo: every method on the tiny backbone + toy world, then one summary table.
# make test: the whole test suite (CPU, offline). make bench: memory / FLOPs / CPU time of every method's steps
# (bench.py, offline, no GPU). All install what they need into .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
METHODS := $(basename $(wildcard prfl.py velr.py prism.py dina_lrm.py))

.PHONY: install demo test bench clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

install: $(BIN)/.installed

demo: install
	@rm -rf runs/demo  # a run folder is never reused without --resume: the demo starts afresh
	@for m in $(METHODS); do echo "== $$m"; $(BIN)/python $$m.py --out-dir runs/demo/$$m || exit 1; done
	@$(BIN)/python toy.py summarize runs/demo

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python bench.py

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf runs .pytest_cache
