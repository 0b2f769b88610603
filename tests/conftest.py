import sys
from pathlib import Path

# the method scripts and common.py live at the repository root (no package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
