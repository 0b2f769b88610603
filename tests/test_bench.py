"""Tests of --estimate-memory in the method scripts and of bench.py (issue 8): every stage of every script is
estimated from the script's own code, the numbers add up, the linear extrapolation VELR uses is exact, the
latent reward beats RGB ReFL at a small (not tiny) size, and the adapter-aware checkpointing DiNa's ReFL needs."""
import importlib
import re
import sys

import pytest
import torch

import bench
import common
import rundir
import estimate
import prism
from estimate import StageEstimates, extrapolate

TINY = common.WAN_CONFIGS["tiny"]
# Wan2.1-1.3B blocks at full size (480x832x81), 2 of them: a fake run takes a second.
WAN2 = dict(common.WAN_CONFIGS["wan2.1-1.3b"], transformer=dict(common.WAN_CONFIGS["wan2.1-1.3b"]["transformer"],
                                                                num_layers=2))
# Small, not tiny: the real Wan VAE on 64x64x9 videos and a 1-block tiny-width transformer, on fake tensors
# (a fake op costs ~0.2 ms whatever its size, so the block count sets the time).
SMALL = dict(TINY, height=64, width=64, num_frames=9, vae=common.WAN_CONFIGS["wan2.1-1.3b"]["vae"],
             transformer=dict(TINY["transformer"], num_layers=1))
# Each script's args shrunk to 1 block, and its stage count: --estimate-memory prints one line per stage.
# (the first row of each is the load phase: text encoding with the DiT and VAE resident)
SCRIPTS = {"prfl": (["--rm-blocks", "1", "--lora-rank", "8", "--num-steps", "10"], 3),
           "velr": (["--ensemble-size", "2", "--lrm-dim", "64", "--lora-rank", "8", "--num-steps", "10",
                     "--mid-step", "2", "4", "--truncated-steps", "3"], 6),  # fine-tune: step / offload / none
           "prism": (["--num-blocks", "1", "--head-dim", "64", "--num-steps", "10"], 4),
           "dina_lrm": (["--rm-blocks", "1", "--taps", "1", "--num-steps", "10"], 3)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_estimate_memory_of_each_script_at_a_small_size(name, monkeypatch, capsys):
    monkeypatch.setitem(common.WAN_CONFIGS, "small", SMALL)
    module = importlib.import_module(name)
    argv, stages = SCRIPTS[name]
    res = module.main(rundir.parse_args(module.Args, module.TINY, ["--backbone", "small", "--estimate-memory", *argv]))
    out = capsys.readouterr().out
    assert len(res) == stages
    assert len(re.findall(r"^estimated peak: [\d.]+ GiB \(weights .*\), [\d.]+ TFLOPs  \| ", out, re.M)) == stages
    for label, est in res.items():
        b = est["breakdown"]
        assert sum(b.values()) == est["peak_bytes"] and min(b.values()) >= 0 and est["flops"] > 0, label
        assert b.get("optimizer", 1) > 0, label            # a training step trains something
    load, *steps = res.values()
    assert next(iter(res)).startswith("load phase") and load["breakdown"]["weights"] > steps[0]["breakdown"]["weights"] / 2
    if name == "velr":  # the VAE decode with gradient dominates; the ensemble on the latent costs little
        lrm, latent, offload, plain, pixel = steps
        # --window-checkpointing: keeping K gradient steps' block inputs costs memory, recomputing them FLOPs
        assert latent["peak_bytes"] < plain["peak_bytes"] and offload["peak_bytes"] < plain["peak_bytes"]
        assert latent["flops"] > plain["flops"] == offload["flops"]
        assert latent["peak_bytes"] < pixel["peak_bytes"] and latent["breakdown"]["weights"] == pixel["breakdown"]["weights"]
        assert 10 * latent["breakdown"]["activations"] < pixel["breakdown"]["activations"]
        assert pixel["flops"] > latent["flops"] > lrm["flops"]
    if name == "prism":  # a pair with grad > one latent without; N candidates with CFG > one latent
        head, score, bon = steps
        assert score["peak_bytes"] < head["peak_bytes"] and score["peak_bytes"] < bon["peak_bytes"]
        assert bon["rollout_flops"] > 0
    if name in ("prfl", "dina_lrm"):  # the tuning step skips its no-grad rollout and counts it
        assert steps[-1]["rollout_flops"] > 0 and "rollout_flops" not in steps[0]


def test_bench_table_on_tiny(monkeypatch, tmp_path, capsys):
    # The tiny column: real tensors, timed. PRISM and the baseline rows only (the other scripts' tiny runs
    # take 20 s more; their --estimate-memory is tested above).
    monkeypatch.chdir(tmp_path)                        # nothing may be written: no run folder, no toy data
    monkeypatch.setattr(StageEstimates, "steps", 1)
    monkeypatch.setattr(bench, "METHODS", [("PRISM", prism)])
    monkeypatch.setattr(sys, "argv", ["bench.py", "--backbones"])
    bench.main()
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert out.count("measured on the CPU:") == 6
    rows = re.findall(r"^\| (PRISM|baseline) +\| .+ \| ([\d.]+) +\| ([\d.]+) +\|$", out, re.M)
    assert [r[0] for r in rows] == ["PRISM"] * 3 + ["baseline"] * 3
    ms = {i: float(r[1]) for i, r in enumerate(rows)}
    assert all(v > 0 for v in ms.values())
    mib = [float(r[2]) for r in rows]
    assert mib[4] > mib[5] and mib[4] > mib[3]         # RGB ReFL, all frames > first frame, > the LoRA step


def test_stage_estimates_add_up_and_rollouts_are_counted(capsys):
    with StageEstimates("test", "tiny") as est:        # real tensors: the estimate is a measurement here
        pipe = est.build(lambda: est.pipeline(lora_rank=4))
        x, e, _ = est.inputs()
        step = est.step("LoRA step", estimate.transformer_step, pipe.transformer, x, e, rollout_forwards=3)
    b = step["breakdown"]
    assert step["peak_bytes"] == b["weights"] + b["optimizer"] + b["activations"] and min(b.values()) > 0
    vae = sum(p.numel() * 4 for p in pipe.vae.parameters())
    assert b["weights"] > vae                          # the pipeline's VAE is resident, so it counts
    fwd = estimate.estimate(torch.no_grad()(common.predict_velocity), pipe.transformer, x, 0.5, e)["flops"]
    assert step["rollout_flops"] == 3 * fwd > 0
    assert step["seconds_per_step"] > 0 and "estimated peak:" in capsys.readouterr().out


def test_k_gradient_steps_cost_linearly_so_extrapolation_is_exact():
    # VELR estimates K = 10 steps with gradient from runs at K = 1 and 2; check that against a real K = 3 run.
    def k_steps(tr, x, e, K):  # no LoRA (fewer ops): the gradient goes to x
        x, _ = common.rollout(tr, x, e, common.sigma_schedule(K, 3.0), 0, K, grad_steps=range(K))
        x.square().mean().backward()

    common.WAN_CONFIGS["test-wan2"] = WAN2
    try:
        with StageEstimates("test", "test-wan2") as est:
            pipe = est.build(lambda: est.pipeline())
            x, e, _ = est.inputs()
            x.requires_grad_(True)
            runs = [est.step("", k_steps, pipe.transformer, x, e, K=k, quiet=True) for k in (1, 2, 3)]
    finally:
        del common.WAN_CONFIGS["test-wan2"]
    assert runs[1]["peak_bytes"] - runs[0]["peak_bytes"] > 2 * 96 * 2**20   # 2 checkpointed block inputs
    three = extrapolate(runs[0], runs[0], runs[1], 3)
    assert three["flops"] == runs[2]["flops"]
    assert abs(three["peak_bytes"] - runs[2]["peak_bytes"]) < 0.01 * runs[2]["peak_bytes"]
