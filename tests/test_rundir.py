"""Tests of rundir.py: safe run folders, checkpoints that resume bit-identically, SIGINT / SIGTERM, plots."""
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import common
import rundir

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Args:
    backbone: str = common.arg("tiny", "backbone")
    out_dir: str = common.arg("", "run folder")
    resume: bool = common.arg(False, "resume")
    lr: float = common.arg(1e-2, "lr")
    steps: int = common.arg(12, "steps")
    max_steps: int = common.arg(None, "cap", type=int)


def test_default_folders_are_unique_even_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = {rundir.Run("m", Args()).dir for _ in range(3)}
    assert len(dirs) == 3 and all(d.is_dir() and (d / "args.json").is_file() for d in dirs)


def test_an_existing_run_folder_is_refused_unless_resumed_with_the_same_arguments(tmp_path):
    run = rundir.Run("m", Args(), out_dir=tmp_path / "r")
    run.log(0, "rm", loss=1.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    with pytest.raises(common.UserError, match="already holds a run; pass --resume"):
        rundir.Run("m", Args(), out_dir=tmp_path / "r")
    with pytest.raises(common.UserError, match=r"--lr 0.01 \(now 0.5\)"):
        rundir.Run("m", Args(lr=0.5, resume=True), out_dir=tmp_path / "r", resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before  # nothing touched
    rundir.Run("m", Args(resume=True, max_steps=3), out_dir=tmp_path / "r", resume=True)  # may differ: max_steps
    with pytest.raises(common.UserError, match="not a run folder"):
        rundir.Run("m", Args(), out_dir=tmp_path / "empty", resume=True)


def _train(run, stop_at=None, every=0):
    """A stage of a toy method: model, AdamW, a schedule, batches from the global RNG and a named generator, and a
    loop tensor (like a replay buffer), all of which a resume must restore."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    model[0].requires_grad_(False)  # frozen: not in the checkpoint, must stay as built
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    g = torch.Generator().manual_seed(1)
    memory = torch.zeros(3)
    for step in run.steps("rm", 12, dict(model=model), opt, sched, dict(data=g), dict(memory=memory), every=every,
                          stop_at=stop_at):
        x = torch.randn(16, 4) + torch.randn(16, 4, generator=g)
        loss = (model(x).squeeze(-1) - x.sum(1)).square().mean() + memory.sum() * 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        memory[step % 3] = loss.detach()
        run.log(step, "rm", loss=loss)
    return model, opt, memory


def test_stopped_by_max_steps_then_resumed_equals_one_run(tmp_path):
    full, full_opt, full_mem = _train(rundir.Run("m", Args(), out_dir=tmp_path / "a"))
    first = rundir.Run("m", Args(max_steps=5), out_dir=tmp_path / "b")
    assert first.start_step("rm") == 0
    _train(first, stop_at=5, every=2)
    assert rundir.Run("m", Args(resume=True), out_dir=tmp_path / "b", resume=True).start_step("rm") == 5
    part, part_opt, part_mem = _train(rundir.Run("m", Args(resume=True), out_dir=tmp_path / "b", resume=True))
    for a, b in zip(full.state_dict().values(), part.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(full_mem, part_mem)
    for sa, sb in zip(full_opt.state_dict()["state"].values(), part_opt.state_dict()["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    run = rundir.Run("m", Args(resume=True), out_dir=tmp_path / "b", resume=True)
    assert [r["step"] for r in run.read_metrics("rm")] == list(range(12))
    assert rundir.plot_metrics(run, "rm", ["loss"]).read_bytes()[:4] == b"\x89PNG"


SCRIPT = textwrap.dedent("""
    import sys, time, dataclasses
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import common, rundir, test_rundir as T
    def main(args):
        run = rundir.Run("m", args, out_dir=args.out_dir, resume=args.resume)
        real = run.steps
        def slow(*a, **k):
            for step in real(*a, **k):
                print("step", step, flush=True)
                yield step
                time.sleep(0.3 if not args.resume else 0)
        run.steps = slow
        model, opt, memory = T._train(run)
        common.save_safetensors(model.state_dict(), run.dir / "final.safetensors")
    rundir.cli(main, T.Args, {{}})
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_stage_saves_a_checkpoint_that_resumes_to_the_same_result(sig, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(script), "--out-dir", str(tmp_path / "r")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:  # wait until a few steps ran
        if line.startswith("step 3"):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and "checkpoint saved in" in err and "--resume" in err
    ckpt = tmp_path / "r" / "checkpoints" / "rm.safetensors"
    from safetensors import safe_open
    with safe_open(str(ckpt), "pt") as f:  # loadable, and at the step it says
        assert '"step": ' in f.metadata()["state"] and any(k.startswith("model/") for k in f.keys())
    r = subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path / "r"), "--resume"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    full, _, _ = _train(rundir.Run("m", Args(), out_dir=tmp_path / "unbroken"))
    from safetensors.torch import load_file
    resumed = load_file(str(tmp_path / "r" / "final.safetensors"))
    assert all(torch.equal(v, resumed[k]) for k, v in full.state_dict().items())


def test_demo_summary_prints_each_claim_with_its_margin(tmp_path):
    import json
    import toy
    for m, claims in (("a", [dict(claim="gain", mean=0.2, se=0.05)]), ("b", [])):
        (tmp_path / m).mkdir()
        (tmp_path / m / "summary.json").write_text(json.dumps(dict(claims=claims, accuracy=0.75)))
    out = toy.summarize(tmp_path)
    assert "| a      | gain  | +0.200 ± 0.050 | 4.0 |" in out and out.count("0.750") == 2 and "claims" not in out
