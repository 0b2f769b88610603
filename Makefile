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

# Two lanes, one thread per script (the tiny models gain less from a second thread than from a second process), each
# lane running its scripts in turn: PRISM builds the toy pairs that DiNa-LRM trains on and whose A side is PRFL's
# binary set (toy.toy_dataset), so PRFL goes after VELR; the lanes take about as long.
# Each script's output goes to runs/demo/<m>.log.
DEMO_LANES := "velr prfl" "prism dina_lrm"
demo: install
	@rm -rf runs/demo && mkdir -p runs/demo  # a run folder is never reused without --resume: the demo starts afresh
	@for lane in $(DEMO_LANES); do \
	  (for m in $$lane; do echo "== $$m (log: runs/demo/$$m.log)"; \
	    OMP_NUM_THREADS=1 $(BIN)/python $$m.py --out-dir runs/demo/$$m > runs/demo/$$m.log 2>&1; echo $$? > runs/demo/$$m.rc; \
	    test "$$(cat runs/demo/$$m.rc)" = 0 || break; done) & \
	done; wait
	@fail=0; for m in $(METHODS); do test "$$(cat runs/demo/$$m.rc 2>/dev/null)" = 0 && continue; fail=1; \
	  echo "== $$m failed, or did not run after a failure in its lane:"; tail -n 20 runs/demo/$$m.log 2>/dev/null; \
	done; test $$fail = 0
	@$(BIN)/python toy.py summarize runs/demo

bench: install
	OMP_NUM_THREADS=1 $(BIN)/python bench.py

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf runs .pytest_cache
