import os
import sys
from pathlib import Path

# Tiny models: thread start-up costs more than it saves, and on a shared 2-core machine
# oversubscribed OpenMP threads slow the suite down many times. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# the method scripts and common.py live at the repository root (no package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


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
