"""dataset.py: lazy reading (Rows), bf16 storage, videos stored once, scans, and the step-ordered DataLoader."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import common
import dataset

ROOT = Path(__file__).resolve().parents[1]


def pairs_tables(n=12, videos=7, shape=(16, 2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(videos, *shape, generator=g)
    ia, ib = torch.randint(0, videos, (n,), generator=g), torch.randint(0, videos, (n,), generator=g)
    prompts = dict(prompt_embeds=torch.randn(3, 8, 32, generator=g), prompt_mask=torch.ones(3, 8, dtype=torch.bool))
    rows = dict(pref=torch.randint(0, 3, (n,), generator=g), prompt_idx=torch.randint(0, 3, (n,), generator=g))
    return table, ia, ib, prompts, rows


def test_lazy_rows_equal_eager_and_videos_are_stored_once(tmp_path):
    table, ia, ib, prompts, rows = pairs_tables()
    meta = dict(kind="pairs", prompts=["a", "b", "c"])
    dataset.save(tmp_path / "once", dict(latents=table, index_a=ia, index_b=ib, **prompts, **rows), meta)
    dataset.save(tmp_path / "twice", dict(latents_a=table[ia], latents_b=table[ib], **prompts, **rows), meta)
    assert (tmp_path / "once/shard-00000.safetensors").stat().st_size < (tmp_path / "twice/shard-00000.safetensors").stat().st_size
    eager, _ = dataset.load(tmp_path / "twice", "pairs")
    for folder in ("once", "twice"):
        lazy, _ = dataset.load(tmp_path / folder, "pairs", lazy=True)
        assert isinstance(lazy["latents_a"], dataset.Rows) and lazy["latents_a"].shape == eager["latents_a"].shape
        idx = torch.tensor([5, 0, 11, 5])
        for k in ("latents_a", "latents_b"):
            assert torch.equal(lazy[k][idx], eager[k][idx]) and torch.equal(lazy[k][3], eager[k][3])
            assert torch.equal(lazy[k][2:6], eager[k][2:6])


def test_bf16_storage_halves_the_shard_and_reads_back_fp32(tmp_path):
    z = torch.randn(20, 16, 2, 4, 4)
    base = dict(label=torch.ones(20), prompt_idx=torch.zeros(20, dtype=torch.long),
                prompt_embeds=torch.zeros(1, 8, 32), prompt_mask=torch.ones(1, 8, dtype=torch.bool))
    dataset.save(tmp_path / "f32", dict(latents=z, **base), dict(kind="binary", prompts=["p"]))
    dataset.save(tmp_path / "bf16", dict(latents=z, **base), dict(kind="binary", prompts=["p"]), latent_dtype=torch.bfloat16)
    size = lambda f: (tmp_path / f / "shard-00000.safetensors").stat().st_size
    assert size("bf16") < 0.55 * size("f32")
    for lazy in (False, True):
        d, _ = dataset.load(tmp_path / "bf16", "binary", lazy=lazy)
        got = d["latents"][torch.arange(20)]
        assert got.dtype == torch.float32 and torch.equal(got, z.bfloat16().float())


def test_lazy_scans_find_bad_rows_and_repeats(tmp_path):
    table, ia, ib, prompts, rows = pairs_tables()
    table[4, 0, 0, 0, 0] = float("nan")
    dataset.save(tmp_path / "nan", dict(latents=table, index_a=ia, index_b=ib, **prompts, **rows),
                 dict(kind="pairs", prompts=["a", "b", "c"]))
    with pytest.raises(common.UserError, match=r"NaN/inf values \(stored rows \[4\]\)"):
        dataset.load(tmp_path / "nan", "pairs", lazy=True)
    table, ia, ib, prompts, rows = pairs_tables()
    ia[5], ib[5], rows["prompt_idx"][5], rows["pref"][5] = ia[2], ib[2], rows["prompt_idx"][2], rows["pref"][2]
    dataset.save(tmp_path / "dup", dict(latents=table, index_a=ia, index_b=ib, **prompts, **rows),
                 dict(kind="pairs", prompts=["a", "b", "c"]))
    lazy, _ = dataset.load(tmp_path / "dup", "pairs", lazy=True)
    eager, _ = dataset.load(tmp_path / "dup", "pairs")
    kept_lazy = dataset.drop_repeats(lazy, "pairs", "drop", "dup")
    kept = dataset.drop_repeats(eager, "pairs", "drop", "dup")
    assert isinstance(kept_lazy["latents_a"], dataset.Rows) and len(kept_lazy["pref"]) == len(kept["pref"]) < 12
    assert torch.equal(kept_lazy["latents_b"][torch.arange(len(kept["pref"]))], kept["latents_b"])
    geo = dict(latent_shape=(16, 2, 4, 4), height=32, width=32, num_frames=5)
    dataset.check_latents(lazy, geo, "dup")  # the right shape and scale pass
    with pytest.raises(common.UserError, match="holds latents"):
        dataset.check_latents(lazy, dict(geo, latent_shape=(16, 3, 4, 4)), "dup")


def test_batch_order_is_a_function_of_seed_and_step():
    n, b = 10, 4
    steps = [dataset.batch_rows(s, n, b, seed=3) for s in range(5)]
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))  # epochs
    assert torch.equal(dataset.batch_rows(3, n, b, seed=3), steps[3])  # a resumed run reads the same rows
    assert not torch.equal(dataset.batch_rows(3, n, b, seed=4), steps[3])


def test_batches_resumed_at_a_step_yield_the_rest(tmp_path):
    z = torch.randn(30, 16, 2, 4, 4)
    dataset.save(tmp_path / "d", dict(latents=z, label=torch.arange(30.0), prompt_idx=torch.zeros(30, dtype=torch.long),
                                     prompt_embeds=torch.zeros(1, 8, 32), prompt_mask=torch.ones(1, 8, dtype=torch.bool)),
                 dict(kind="binary", prompts=["p"]))
    data, _ = dataset.load(tmp_path / "d", "binary", lazy=True)
    train = torch.arange(5, 30)
    whole = [b for _, b in zip(range(6), dataset.batches(data, ["latents", "label"], 8, 0, 0, rows=train, workers=2))]
    rest = [b for _, b in zip(range(3), dataset.batches(data, ["latents", "label"], 8, 0, 3, rows=train, workers=0))]
    for a, b in zip(whole[3:], rest):
        assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["latents"], b["latents"])
    assert all(torch.equal(b["latents"], z[b["rows"]]) and b["rows"].min() >= 5 for b in whole)


READER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import dataset
    data, _ = dataset.load(sys.argv[1], "binary", lazy=sys.argv[2] == "lazy")
    for step, b in zip(range(int(sys.argv[3])), dataset.batches(data, ["latents", "label"], 16, 0, 0, workers=0)):
        (b["latents"] * 2).sum()
    # VmHWM: this program's own peak RSS (ru_maxrss would also count the forking test process's, kept across exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024)
""")


def test_peak_memory_stays_flat_while_the_dataset_grows_tenfold(tmp_path):
    """A pass over every row of a 10x larger dataset: peak RSS within 20 % when lazy; the eager load (control)
    grows by most of the dataset's size, so this test can fail."""
    script = tmp_path / "read.py"
    script.write_text(READER.format(root=str(ROOT)))
    shape = (16, 4, 32, 32)  # 256 KiB a row in fp32
    for n in (40, 400):
        dataset.save(tmp_path / f"d{n}", dict(latents=torch.randn(n, *shape), label=torch.ones(n),
                                             prompt_idx=torch.zeros(n, dtype=torch.long), prompt_embeds=torch.zeros(1, 8, 32),
                                             prompt_mask=torch.ones(1, 8, dtype=torch.bool)), dict(kind="binary", prompts=["p"]))
    rss = lambda n, mode: int(subprocess.run([sys.executable, str(script), str(tmp_path / f"d{n}"), mode, str(n // 16 + 1)],
                                             capture_output=True, text=True, check=True).stdout)
    small, big, eager = rss(40, "lazy"), rss(400, "lazy"), rss(400, "eager")
    disk = (tmp_path / "d400" / "shard-00000.safetensors").stat().st_size
    print(f"peak RSS: lazy {small / 2**20:.0f} MiB (40 rows) -> {big / 2**20:.0f} MiB (400 rows, {disk / 2**20:.0f} MiB on disk); eager {eager / 2**20:.0f} MiB")
    assert big < 1.2 * small, (small, big)
    assert eager > big + 0.6 * disk, (eager, big, disk)
