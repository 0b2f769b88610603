"""The four method scripts speak one CLI vocabulary, and --help shows what will run (issue 15)."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common
import rundir

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["prfl", "velr", "prism", "dina_lrm"]
SHARED = ["--stage", "--backbone", "--data", "--out-dir", "--seed", "--device", "--dtype", "--height", "--width",
          "--num-frames", "--num-steps", "--guidance-scale", "--eval-samples", "--save-videos", "--max-steps",
          "--grad-accum", "--reward-ckpt", "--test-fraction", "--toy-size", "--toy-cache", "--estimate-memory",
          "--on-duplicates"]
TRAINS_A_TRANSFORMER = ["prfl", "velr", "dina_lrm"]  # PRISM's blocks are frozen and never backpropagated


def help_text(name: str, argv=()) -> str:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit):
        rundir.parse_args(module.Args, module.TINY, [*argv, "--help"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_the_shared_flags(name, capsys):
    help_text(name)
    text = capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    missing = [f for f in SHARED + ["--gradient-checkpointing"] * (name in TRAINS_A_TRANSFORMER) if f not in flags]
    assert not missing, f"{name}.py lacks {missing}"
    # the old names of the same concepts are gone
    assert not flags & {"--rollout-steps", "--eval-guidance", "--num-videos", "--eval-seeds", "--bon-seeds", "--out",
                        "--toy-pairs", "--toy-samples", "--tiny-defaults", "--refl-steps"}, flags


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_value_that_runs_on_each_backbone(name, capsys):
    module = importlib.import_module(name)
    field, tiny = next(iter(module.TINY.items()))
    paper = next(f for f in module.Args.__dataclass_fields__.values() if f.name == field)
    paper = paper.default if not callable(paper.default_factory) else paper.default_factory()
    flag = "--" + field.replace("_", "-")
    help_text(name)
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(re.escape(flag) + r".*?\[paper: " + re.escape(str(paper)) + "; tiny: " + re.escape(str(tiny))
                     + r"\] \(default: " + re.escape(str(tiny)) + r"\)", text), (flag, text[:3000])
    help_text(name, ["--backbone", "wan2.1-1.3b"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(re.escape(flag) + r".*?\(default: " + re.escape(str(paper)) + r"\)", text)


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_data_ends_the_process_with_one_error_line(name, tmp_path):
    """The one test per script that checks the process boundary: `python <name>.py` as a user types it. Every other
    bad-input test runs the same entry point in the test process (conftest's `cli`, no 2.7 s interpreter start-up);
    this one shows that the exit status and stderr a shell sees are what those tests assert: a data mistake exits 1
    with an `error:` message naming the cause, no Traceback, no run folder."""
    for argv, code, names in [(["--data", tmp_path / "nowhere"], 1, "nowhere")]:
        r = subprocess.run([sys.executable, f"{name}.py", *map(str, argv), "--out-dir", str(tmp_path / "run")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == code, (argv, r.returncode, r.stderr[-2000:])
        assert r.stderr.startswith(("error:", "usage:")) and names in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()
