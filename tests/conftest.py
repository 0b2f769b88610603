import importlib
import os
import random
import signal
import sys
from pathlib import Path

# Tiny models: thread start-up costs more than it saves, and on a shared 2-core machine
# oversubscribed OpenMP threads slow the suite down many times. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# the method scripts and common.py live at the repository root (no package)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def cli(capsys):
    """`cli(script, argv, cwd=ROOT) -> (returncode, stdout, stderr)`: what `python <script>.py *argv` run in `cwd`
    gives, run in this process through the script's own entry point, `rundir.cli(main, Args, TINY)`, exactly as its
    `if __name__ == "__main__"` line calls it. A subprocess per case cost ~2.7 s of imports (torch, diffusers) for a
    check that takes well under a second; the ~120 bad-input cases spent minutes on it. tests/test_cli.py keeps one
    real process per script, for what only a process shows (the exit status, stderr as a user sees it).

    What the interpreter does at the boundary is done here: a return is exit 0; SystemExit's code is the status
    (None: 0; a message: printed to stderr, 1). Any other exception is a bug that a process would have shown as a
    Traceback: it propagates and the test fails. `script` is a module name or an object with main, Args, TINY (and
    __name__). What rundir.cli and main change globally is put back, so later tests see the state they would have."""
    import rundir  # here, not at the top: a file without CLI tests need not import the models' stack

    def run(script, argv, cwd=ROOT):
        module = importlib.import_module(script) if isinstance(script, str) else script
        argv0, old_cwd = sys.argv, os.getcwd()
        sigterm = signal.getsignal(signal.SIGTERM)  # rundir.cli sets its own (SIGTERM stops like Ctrl-C)
        rng = torch.get_rng_state(), random.getstate(), np.random.get_state()  # main seeds them (seed_everything)
        capsys.readouterr()  # what the test printed before is not the script's output
        sys.argv = [f"{module.__name__}.py", *map(str, argv)]
        os.chdir(cwd)  # the subprocess's cwd: relative defaults (runs/, --toy-cache runs/toy_data) land there
        try:
            rundir.cli(module.main, module.Args, module.TINY)
            code = 0
        except SystemExit as e:  # argparse's usage error / --help, or rundir.cli's sys.exit(UserError.code)
            code = e.code
        finally:
            sys.argv = argv0
            os.chdir(old_cwd)
            signal.signal(signal.SIGTERM, sigterm)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
        if code is None:
            code = 0
        elif not isinstance(code, int):  # sys.exit("message"): the interpreter prints it and exits 1
            print(code, file=sys.stderr)
            code = 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def shared_toy_cache(tmp_path_factory):
    """One toy-data cache folder for the whole session, shared by the xdist workers (the parent of their base temp
    folders), so a dataset that two files need (PRISM's and DiNa-LRM's pairs) is built once. toy.toy_dataset writes
    meta.json last, so a worker never reads a half-written dataset; two workers may both build it, harmlessly."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy_data"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: xdist hands whole files to the two workers in
# collection order as they free up. The files with a demo run (several CPU minutes each) go first, longest first,
# so the short files fill the gaps at the end instead of one long file starting last.
SLOW_FIRST = ["test_velr.py", "test_dina_lrm.py", "test_prfl.py", "test_prism.py", "test_real_path.py",
              "test_distributed.py"]


def pytest_collection_modifyitems(items):
    order = lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=order)  # stable: each file's own order is kept
