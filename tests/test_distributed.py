"""common.py's multi-GPU layer on CPU (gloo): `torchrun --nproc_per_node 2` trains what one process trains.

This file is also the worker: run as a script it trains a LoRA and a small head for a few steps of flow matching on
the tiny transformer through common.shard / local_batch / save_lora and rundir.Run (checkpoints, --resume), and
writes the result; `OUT [MODE [STOP [BATCH]]]`, several jobs joined by `+` run one after another in the same
processes (a launch costs ~15 s of interpreter and import start-up on two CPU cores, the 4 training steps well under
one). The method scripts' own torchrun tests are in their test files."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(out: str, dtype: str = "fp32", resume: bool = False, stop: int | None = None, batch: int = 8):
    import dataclasses
    import common
    import rundir

    Args = dataclasses.make_dataclass("Args", [("backbone", str, "tiny"), ("dtype", str, dtype)])

    device = rundir.pick_device("cpu")
    embeds = torch.randn(batch, 32, 32, generator=torch.Generator().manual_seed(1))
    common.local_batch(embeds)  # a batch that does not split fails here, before diffusers is imported and tiny loads
    rundir.seed_everything(0)  # every rank builds the same LoRA and head
    pipe = common.load_backbone("tiny", device, dtype=common.pick_dtype(dtype, device))
    transformer = pipe.transformer.requires_grad_(False)
    common.add_lora(transformer, 4)
    head = torch.nn.Linear(16, 1)
    common.shard(transformer, head)
    opt = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-2)
    run = rundir.Run("dist", Args(), out, resume=resume)
    g, shape = torch.Generator().manual_seed(0), common.backbone_geometry(pipe)["latent_shape"]
    for step in run.steps("tune", 4, modules=dict(transformer=transformer, head=head), optimizer=opt,
                          generators=dict(g=g), stop_at=stop):
        x0, eps, sigma = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g), torch.rand(batch, generator=g)
        x0, eps, sigma, e = (common.local_batch(t) for t in (x0, eps, sigma, embeds))  # this rank's share
        v = common.predict_velocity(transformer, common.add_noise(x0, eps, sigma), sigma, e)
        loss = (v - common.velocity_target(x0, eps)).pow(2).mean() + head(v.mean((2, 3, 4))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(step, "tune", loss=loss.item())
    if common.rank_world()[1] > 1:  # FSDP2 gives the weights back after each forward (a root keeps them otherwise)
        from torch.distributed.tensor import DTensor
        with torch.no_grad():
            common.predict_velocity(transformer, x0, sigma, e)
        assert all(isinstance(p, DTensor) for p in [*transformer.blocks.parameters(), *head.parameters()])
    common.save_lora(transformer, run.dir)
    common.save_safetensors(dict(head.state_dict()), run.dir / "head.safetensors")
    print("trained", out)  # rank 0 only: common.dist_init sends the other ranks' prints nowhere


def launch(out, *extra, procs: int = 2):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else
           [sys.executable]) + [__file__, str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(out) -> dict:
    return {**load_file(str(Path(out) / "pytorch_lora_weights.safetensors")),
            **{f"head.{k}": v for k, v in load_file(str(Path(out) / "head.safetensors")).items()}}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One `torchrun --nproc_per_node 2` launch, two jobs: `two`, 4 steps unbroken, and `split`, stopped after 2 (its
    --resume is a second launch, in test_two_processes_resume_bit_identical: fresh processes that read the files)."""
    d = tmp_path_factory.mktemp("dist")
    r = launch(d / "two", "+", d / "split", "new", "2")
    return d, r


def test_two_processes_train_what_one_process_trains(two_processes, tmp_path):
    d, r = two_processes
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:  # one process: this one (no WORLD_SIZE), as `python tests/test_distributed.py <out>` without its start-up
        train(str(tmp_path / "one"))
    finally:  # train seeds the global generators
        torch.set_rng_state(rng[0]), random.setstate(rng[1]), np.random.set_state(rng[2])
    one, two = weights(tmp_path / "one"), weights(d / "two")
    assert one.keys() == two.keys() and len(one) > 100
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # one run folder, written by rank 0 only: one metrics line per step, one LoRA
    assert len((d / "two" / "metrics.jsonl").read_text().splitlines()) == 4
    assert r.stdout.count("trained ") == 2  # once per job: the other rank prints nothing


def test_two_processes_resume_bit_identical(two_processes):
    d, _ = two_processes
    launch(d / "split", "resume")
    whole, split = weights(d / "two"), weights(d / "split")
    for k in whole:
        assert torch.equal(whole[k], split[k]), k


def test_uneven_batch_is_a_clear_error(tmp_path):
    # the worker splits its batch before it loads the backbone: a 2-process failure without the ~5 s diffusers import
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path / "o"),
           "new", "4", "7"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "does not split over 2 processes" in r.stderr


if __name__ == "__main__":
    jobs = [[]]
    for a in sys.argv[1:]:  # OUT [MODE [STOP [BATCH]]] [+ OUT ...]
        jobs.append([]) if a == "+" else jobs[-1].append(a)
    for out, mode, stop, batch in (job + ["new", "-", "8"][len(job) - 1:] for job in jobs):
        train(out, resume=mode == "resume", stop=None if stop == "-" else int(stop), batch=int(batch))
