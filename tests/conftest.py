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
