"""Tests of prepare.py: real videos on disk -> the latent datasets the methods train on (tiny backbone)."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch

import common
import rundir
import dataset
import toy
import prepare

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _write(path, frames, fps):
    imageio.mimwrite(path, [np.asarray(f, np.uint8) for f in frames], fps=fps, macro_block_size=16)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Short mp4 clips (imageio-ffmpeg): random content so every clip has its own latent."""
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    clip = lambda n, h, w: rng.integers(0, 256, (n, h, w, 3))
    for i in range(4):
        _write(d / f"v{i}.mp4", clip(9 + 4 * (i % 3), 32, 32), fps=16)   # 9, 13, 17, 9 frames
    _write(d / "wide.mp4", clip(9, 32, 64), fps=16)                          # resized + centre-cropped
    _write(d / "fast.mp4", clip(17, 32, 32), fps=24)                         # resampled 24 -> 16 fps
    _write(d / "short.mp4", clip(5, 32, 32), fps=16)                         # too few frames for 9 at 16 fps
    _write(d / "gray.mp4", [np.full((32, 32, 3), 10 * i) for i in range(17)], fps=24)
    (d / "broken.mp4").write_text("not a video")
    return d


def _csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def _prepare(input, out, **kw):
    return prepare.main(prepare.Args(input=str(input), out_dir=str(out), **kw))


GOOD = [("v0.mp4", "a red square moving left", "1"), ("v1.mp4", "a blue box moving up", "poor"),
        ("wide.mp4", "a red square moving left", "good"), ("fast.mp4", "a green block moving down", "0"),
        ("v2.mp4", "a blue box moving up", "1")]


@pytest.fixture(scope="module")
def binary_folder(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("binary") / "data"
    _prepare(_csv(videos / "binary.csv", ["video", "prompt", "label"], GOOD), out, shard_size=2)
    return out


# ---------------------------------------------------------------- frames: time resampling, resize, crop
def test_resample_indices_take_the_nearest_source_frame_in_time():
    assert prepare.resample_indices(24, 16, 9) == [0, 2, 3, 5, 6, 8, 9, 11, 12]   # k * 1.5, rounded
    assert prepare.resample_indices(16, 16, 5) == [0, 1, 2, 3, 4]
    assert prepare.resample_indices(8, 16, 5) == [0, 1, 1, 2, 2]                 # slower source: repeats


def test_resize_center_crop_keeps_the_centre_and_the_aspect():
    wide = torch.zeros(2, 3, 32, 96)
    wide[..., 32:64] = 100.0                                      # three vertical bands: 0 | 100 | 0
    assert torch.equal(prepare.resize_center_crop(wide, 32, 32), torch.full((2, 3, 32, 32), 100.0))
    wide[..., 16:80] = 100.0                                      # halved to 16x48, the centre 16 columns
    assert torch.allclose(prepare.resize_center_crop(wide, 16, 16), torch.tensor(100.0))
    assert prepare.resize_center_crop(wide, 16, 48).mean() < 80  # the full width keeps the dark bands
    tall = torch.zeros(1, 3, 96, 32)
    tall[..., :32, :] = 50.0                                      # only the top band is bright
    assert torch.equal(prepare.resize_center_crop(tall, 32, 32), torch.zeros(1, 3, 32, 32))
    small = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    up = prepare.resize_center_crop(small, 8, 16)                 # covers 8x16: scale 4 -> 16x16, keep rows 4..11
    assert up.shape == (1, 3, 8, 16) and up[0, 0, :, 0].min() > small[0, 0, 0, 0]


def test_read_video_resamples_to_the_target_fps(videos):
    x = prepare.read_video(videos / "gray.mp4", fps=16, num_frames=9, height=16, width=16)
    assert x.shape == (3, 9, 16, 16) and x.min() >= -1 and x.max() <= 1
    level = ((x + 1) * 127.5).mean((0, 2, 3))
    expected = 10.0 * torch.tensor(prepare.resample_indices(24, 16, 9), dtype=torch.float32)
    assert (level - expected).abs().max() < 4, (level, expected)  # h264 is lossy by a level or two


# ---------------------------------------------------------------- the three manifest shapes (+ prompts)
def test_binary_csv_gives_the_dataset_the_methods_load(binary_folder, videos):
    data, meta = dataset.load(binary_folder, "binary")
    assert data["latents"].shape == (5, 16, 3, 4, 4)
    assert data["label"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert data["row"].tolist() == [1, 2, 3, 4, 5]
    assert len(sorted(binary_folder.glob("shard-*.safetensors"))) == 3
    assert [meta["prompts"][i] for i in data["prompt_idx"]] == [p for _, p, _ in GOOD]
    assert meta["prompts"] == list(dict.fromkeys(p for _, p, _ in GOOD))
    pipe = common.load_backbone("tiny")
    e, m = common.encode_prompts(pipe, meta["prompts"])
    assert torch.allclose(data["prompt_embeds"], e) and torch.equal(data["prompt_mask"], m)
    # each row's latent is its own video's (posterior mean, normalised), not a neighbour's
    for row, name in [(0, "v0.mp4"), (2, "wide.mp4"), (3, "fast.mp4")]:
        z = common.encode_video(pipe, prepare.read_video(videos / name, 16, 9, 32, 32)[None])[0]
        assert torch.allclose(data["latents"][row], z, atol=1e-5)
    assert not torch.allclose(data["latents"][0], data["latents"][4], atol=1e-2)


def test_prfl_quality_columns_jsonl_label_is_both_good(videos, tmp_path):
    quality = [("good", "good"), ("good", "poor"), (1, 0), (1, 1), ("poor", "poor")]
    lines = [json.dumps(dict(video_path=f"v{i % 4}.mp4", caption=f"a red square moving left {i}",
                             physics_quality=p, human_quality=h)) for i, (p, h) in enumerate(quality)]
    (videos / "prfl.jsonl").write_text("\n".join(lines) + "\n")
    _prepare(videos / "prfl.jsonl", tmp_path / "prfl")
    data, _ = dataset.load(tmp_path / "prfl", "binary")
    assert data["label"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_score_manifest(videos, tmp_path):
    _csv(videos / "score.csv", ["video", "prompt", "score"],
         [("v0.mp4", "a red square moving left", 0.25), ("v3.mp4", "a blue box moving up", -1.5)])
    summary = _prepare(videos / "score.csv", tmp_path / "score")
    data, meta = dataset.load(tmp_path / "score", "score")
    assert data["score"].tolist() == [0.25, -1.5] and meta["kind"] == "score" and summary["rows"] == 2
    (videos / "score.json").write_text(json.dumps([dict(video="v0.mp4", text="a red square moving left", score=0.25)]))
    _prepare(videos / "score.json", tmp_path / "score-json")   # a JSON list, with the 'text' alias for prompt
    assert torch.equal(dataset.load(tmp_path / "score-json", "score")[0]["latents"], data["latents"][:1])


BENCH = ["path_A", "path_B", "A_model", "B_model", "prompt", "VQ", "MQ", "TA", "Overall"]
PAIRS = [("D/v0.mp4", "D/v1.mp4", "m1", "m2", "a red square moving left", "A", "A", "same", "A"),
         ("D/v1.mp4", "D/wide.mp4", "m2", "m3", "a blue box moving up", "B", "same", "B", "B"),
         ("D/fast.mp4", "D/v0.mp4", "m3", "m1", "a red square moving left", "same", "same", "same", "same"),
         ("D/v2.mp4", "D/v3.mp4", "m1", "m2", "a green block moving down", "A", "B", "same", "A")]


@pytest.fixture(scope="module")
def pairs_csv(videos):
    rows = [(a.replace("D/", videos.name + "/"), b.replace("D/", videos.name + "/"), *rest) for a, b, *rest in PAIRS]
    return _csv(videos.parent / "videogen-rewardbench.csv", BENCH, rows)  # paths relative to --video-root


def test_videogen_rewardbench_pairs(pairs_csv, videos, tmp_path):
    _prepare(pairs_csv, tmp_path / "overall", video_root=str(videos.parent), shard_size=3)
    data, meta = dataset.load(tmp_path / "overall", "pairs")
    assert data["pref"].tolist() == [0, 1, 2, 0] and data["latents_b"].shape == (4, 16, 3, 4, 4)
    # A and B keep their sides, and a video shared by two pairs has one latent
    assert torch.equal(data["latents_a"][0], data["latents_b"][2])       # v0 is A in row 1, B in row 3
    assert torch.equal(data["latents_b"][0], data["latents_a"][1])       # v1
    assert not torch.equal(data["latents_a"][0], data["latents_b"][0])
    # ... on disk: each distinct video of a shard once, index_a / index_b counted over the shards; bf16 halves it
    from safetensors.torch import load_file
    shards = [load_file(str(f)) for f in sorted((tmp_path / "overall").glob("shard-*.safetensors"))]
    distinct = [len(set(PAIRS[i][j] for i in range(k, min(k + 3, len(PAIRS))) for j in (0, 1))) for k in (0, 3)]
    assert [len(t["latents"]) for t in shards] == distinct
    assert torch.cat([t["index_a"] for t in shards]).max() < sum(distinct) <= torch.cat([t["index_b"] for t in shards]).max() + 1
    _prepare(pairs_csv, tmp_path / "bf16", video_root=str(videos.parent), shard_size=3, latent_dtype="bf16")
    lazy, _ = dataset.load(tmp_path / "bf16", "pairs", lazy=True)
    assert torch.equal(lazy["latents_b"][torch.arange(4)], data["latents_b"].bfloat16().float())
    _prepare(pairs_csv, tmp_path / "mq", video_root=str(videos.parent), pair_label="MQ")
    assert dataset.load(tmp_path / "mq", "pairs")[0]["pref"].tolist() == [0, 2, 2, 1]
    # PRISM's vote over VQ/MQ/TA: row 4 (A, B, same) conflicts and is dropped, row 3 (all same) is a tie
    s = _prepare(pairs_csv, tmp_path / "prism", video_root=str(videos.parent), pair_label="prism")
    data, _ = dataset.load(tmp_path / "prism", "pairs")
    assert data["pref"].tolist() == [0, 1, 2] and data["row"].tolist() == [1, 2, 3] and s["dropped_by_vote"] == 1


def test_prompts_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red square moving left\n\n  a blue box moving up  \n")
    _prepare(tmp_path / "prompts.txt", tmp_path / "prompts")
    data, meta = dataset.load(tmp_path / "prompts", "prompts")
    assert meta["prompts"] == ["a red square moving left", "a blue box moving up"]
    assert data["prompt_embeds"].shape[:2] == (2, 32) and data["prompt_idx"].tolist() == [0, 1]


def test_manifest_without_labels_gives_prompts_with_real_video_latents(videos, binary_folder, tmp_path):
    """video, prompt only -> kind "prompts" with latents (e.g. PRFL's --sft-data); one table entry per row."""
    manifest = _csv(videos / "sft.csv", ["video", "prompt"], [r[:2] for r in GOOD])
    _prepare(manifest, tmp_path / "sft", shard_size=2)
    data, meta = dataset.load(tmp_path / "sft", "prompts")
    assert data["latents"].shape == (5, 16, 3, 4, 4) and data["prompt_idx"].tolist() == [0, 1, 2, 3, 4]
    assert meta["prompts"] == [p for _, p, _ in GOOD]
    assert torch.equal(data["prompt_embeds"][0], data["prompt_embeds"][2])  # the same prompt, encoded once
    assert torch.equal(data["latents"], dataset.load(binary_folder, "binary")[0]["latents"])


# ---------------------------------------------------------------- bad rows
BAD_ROWS = GOOD[:2] + [("missing.mp4", "a red square moving left", "1"), ("broken.mp4", "a blue box moving up", "0"),
                       ("short.mp4", "a red square moving left", "1"), ("v3.mp4", "a blue box moving up", "maybe"),
                       ("v3.mp4", "", "1")] + GOOD[2:3]


def test_every_bad_row_is_named_before_any_heavy_work(videos, tmp_path):
    manifest = _csv(videos / "bad.csv", ["video", "prompt", "label"], BAD_ROWS)
    with pytest.raises(common.UserError) as e:
        _prepare(manifest, tmp_path / "out")
    msg = str(e.value)
    for row, reason in [(3, "video not found"), (4, "unreadable video"), (5, "too few frames"),
                        (6, "unknown label value 'maybe'"), (7, "no prompt")]:
        assert f"row {row} (line {row + 1}): {reason}" in msg, msg
    assert "row 1 " not in msg and "row 8 " not in msg and "--skip-bad" in msg
    assert not (tmp_path / "out").exists()


def test_skip_bad_keeps_every_good_row_and_reports_the_rest(videos, tmp_path):
    manifest = _csv(videos / "bad.csv", ["video", "prompt", "label"], BAD_ROWS)
    summary = _prepare(manifest, tmp_path / "out", skip_bad=True)
    data, meta = dataset.load(tmp_path / "out", "binary")
    assert data["row"].tolist() == [1, 2, 8] and data["label"].tolist() == [1.0, 0.0, 1.0]
    report = json.loads((tmp_path / "out" / "bad_rows.json").read_text())
    assert [b["row"] for b in report] == [3, 4, 5, 6, 7] and summary["bad_rows"] == 5 and meta["bad_rows"] == 5


def test_a_video_that_fails_while_decoding_is_named_or_skipped(videos, tmp_path, monkeypatch):
    manifest = _csv(videos / "b3.csv", ["video", "prompt", "label"], GOOD[:3])
    real = prepare.read_video
    def read(path, *a):
        if path.name == "v1.mp4":
            raise RuntimeError("Could not read frame 5")
        return real(path, *a)
    monkeypatch.setattr(prepare, "read_video", read)
    with pytest.raises(common.UserError, match=r"row 2 \(line 3\): RuntimeError: Could not read frame 5"):
        _prepare(manifest, tmp_path / "a")
    _prepare(manifest, tmp_path / "b", skip_bad=True)
    assert dataset.load(tmp_path / "b", "binary")[0]["row"].tolist() == [1, 3]
    assert [b["row"] for b in json.loads((tmp_path / "b" / "bad_rows.json").read_text())] == [2]


def test_bad_arguments_fail_early(videos, tmp_path):
    manifest = _csv(videos / "binary.csv", ["video", "prompt", "label"], GOOD)
    with pytest.raises(common.UserError, match="4k\\+1"):
        _prepare(manifest, tmp_path / "x", num_frames=8)
    with pytest.raises(common.UserError, match=r"no \['Overall'\] column"):
        _prepare(_csv(tmp_path / "p.csv", ["path_A", "path_B", "prompt", "VQ"], [("a", "b", "c", "A")]), tmp_path / "y")
    with pytest.raises(common.UserError, match="both label and score"):
        _prepare(_csv(tmp_path / "q.csv", ["video", "prompt", "label", "score"], [("v0.mp4", "p", 1, 2)]),
                 tmp_path / "z")


# ---------------------------------------------------------------- resuming
def test_interrupted_run_resumes_without_duplicates(videos, binary_folder, tmp_path, monkeypatch):
    manifest = _csv(videos / "binary.csv", ["video", "prompt", "label"], GOOD)
    out = tmp_path / "data"
    real_save, real_encode = prepare.save_shard, common.encode_video
    def save_then_die(tensors, path):
        if path.name != "shard-00000.safetensors":
            raise KeyboardInterrupt("killed")
        real_save(tensors, path)
    monkeypatch.setattr(prepare, "save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _prepare(manifest, out, shard_size=2)
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    assert not (out / "meta.json").exists()          # not a dataset until complete: load_dataset refuses it
    (out / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # a write cut short

    monkeypatch.setattr(prepare, "save_shard", real_save)
    encoded = []
    monkeypatch.setattr(common, "encode_video", lambda pipe, v: encoded.append(len(v)) or real_encode(pipe, v))
    summary = _prepare(manifest, out, shard_size=2)
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2 and len(encoded) == 3  # rows 3, 4, 5
    data, _ = dataset.load(out, "binary")
    ref, _ = dataset.load(binary_folder, "binary")          # the same manifest, never interrupted
    assert data["row"].tolist() == [1, 2, 3, 4, 5]
    for k in ref:
        assert torch.allclose(data[k].float(), ref[k].float(), atol=1e-6), k
    again = _prepare(manifest, out, shard_size=2)                    # complete: nothing is redone
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0 and len(encoded) == 3


def test_a_folder_made_with_other_settings_is_refused_unless_overwrite(videos, tmp_path):
    manifest = _csv(videos / "b2.csv", ["video", "prompt", "label"], GOOD[:2])
    _prepare(manifest, tmp_path / "d", shard_size=1)
    with pytest.raises(common.UserError, match=r"differs in \['shard_size'\]"):
        _prepare(manifest, tmp_path / "d", shard_size=2)
    _prepare(manifest, tmp_path / "d", shard_size=2, overwrite=True)
    assert len(list((tmp_path / "d").glob("shard-*.safetensors"))) == 1
    assert dataset.load(tmp_path / "d", "binary")[0]["row"].tolist() == [1, 2]


# ---------------------------------------------------------------- CLI
def test_cli(videos, tmp_path):
    manifest = _csv(videos / "binary.csv", ["video", "prompt", "label"], GOOD)
    r = subprocess.run([sys.executable, "prepare.py", "--input", str(manifest), "--out-dir", str(tmp_path / "cli"),
                        "--shard-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "| binary" in r.stdout and "16x3x4x4" in r.stdout
    assert dataset.load(tmp_path / "cli", "binary")[0]["latents"].shape[0] == 5


def test_cli_bad_rows_exit_with_the_rows_named_and_no_traceback(videos, tmp_path, monkeypatch, capsys):
    bad = _csv(videos / "bad.csv", ["video", "prompt", "label"], BAD_ROWS)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--input", str(bad), "--out-dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit) as e:  # the __main__ block, in-process (no second interpreter start)
        runpy.run_path(str(ROOT / "prepare.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "\nerror: " in "\n" + err and "row 3 (line 4): video not found" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- every method trains on what prepare.py wrote
@pytest.fixture(scope="module")
def method_data(videos, tmp_path_factory):
    """12 rows of each kind over the clips above (toy prompts, so the tiny world can still score samples)."""
    d = tmp_path_factory.mktemp("method_data")
    clips = ["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4", "wide.mp4", "fast.mp4"]
    prompts = toy.toy_prompts("train")[::3]                                   # 12 prompts: no repeated row
    single = [(clips[i % 6], prompts[i]) for i in range(12)]
    _prepare(_csv(videos / "m_bin.csv", ["video", "prompt", "label"],
                  [(v, p, i % 2) for i, (v, p) in enumerate(single)]), d / "binary")
    _prepare(_csv(videos / "m_score.csv", ["video", "prompt", "score"],
                  [(v, p, (i * 7 % 5) / 2 - 1) for i, (v, p) in enumerate(single)]), d / "score", score_source="toy")
    _prepare(_csv(videos / "m_pairs.csv", ["path_A", "path_B", "prompt", "Overall"],
                  [(clips[i % 6], clips[(i + 1) % 6], prompts[i], "AB"[i % 2] if i % 6 else "same")
                   for i in range(12)]), d / "pairs")
    _prepare(_csv(videos / "m_sft.csv", ["video", "prompt"], single[:4]), d / "sft")
    return d


def test_prfl_trains_on_prepared_clips(method_data, tmp_path):
    import prfl
    s = prfl.main(rundir.parse_args(prfl.Args, prfl.TINY, [
        "--data", str(method_data / "binary"), "--sft-data", str(method_data / "sft"), "--out-dir", str(tmp_path / "run"),
        "--rm-steps", "2", "--rm-batch", "4", "--tune-steps", "2", "--batch-size", "2", "--num-steps", "4",
        "--eval-samples", "2", "--save-videos", "0"]))
    assert s["pavrm_test_size"] + round(12 * 0.8) == 12 and np.isfinite(s["pavrm_accuracy_mean"])
    assert (tmp_path / "run" / "pavrm.safetensors").is_file()
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_prism_trains_on_prepared_pairs(method_data, tmp_path):
    import prism
    s = prism.main(rundir.parse_args(prism.Args, prism.TINY, [
        "--stage", "rm", "--data", str(method_data / "pairs"), "--out-dir", str(tmp_path / "run"),
        "--rm-steps", "2", "--rm-batch", "4", "--eval-timesteps", "500"]))
    assert s["train_pairs"] + s["test_pairs"] == 12 and s["test_pairs"] > 0
    assert (tmp_path / "run" / "prism_head.safetensors").is_file()


def test_dina_lrm_trains_on_prepared_pairs(method_data, tmp_path):
    import dina_lrm
    s = dina_lrm.main(rundir.parse_args(dina_lrm.Args, dina_lrm.TINY, [
        "--stage", "rm", "--data", str(method_data / "pairs"), "--out-dir", str(tmp_path / "run"), "--rm-steps", "2",
        "--rm-batch", "4", "--no-ablation", "--eval-sigmas", "0.4", "--ensemble-sigmas", "0.4"]))
    assert s["pairs"] == 12
    assert list((tmp_path / "run").glob("*.safetensors"))


def test_velr_trains_on_prepared_scores(method_data, tmp_path, capsys):
    import velr
    velr.main(rundir.parse_args(velr.Args, velr.TINY, [
        "--stage", "rm", "--data", str(method_data / "score"), "--out-dir", str(tmp_path / "run"),
        "--ensemble-size", "2", "--rm-epochs", "1", "--compare"]))
    assert "re-labelling" not in capsys.readouterr().out   # --score-source toy: VELR keeps the manifest's scores
    assert list((tmp_path / "run").glob("*.safetensors"))


# ---------------------------------------------------------------- bad input through the CLI: named, nothing lost
def _hashes(folder):
    import hashlib
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _cut_video(videos):
    """An mp4 whose index (at the front) is intact and whose frame data is cut: its header alone looks fine."""
    path = videos / "cut.mp4"
    if not path.exists():
        rng = np.random.default_rng(1)
        full = videos / "faststart.mp4"
        imageio.mimwrite(full, [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(17)], fps=16,
                         macro_block_size=16, ffmpeg_params=["-movflags", "+faststart"])
        path.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    return path


BAD_MANIFESTS = {  # name: (header, rows, extra flags, what the message must name)
    "latin-1": (None, None, [], r"bad.csv:3: not UTF-8"),
    "score overflows float32": (["video", "prompt", "score"], [("v0.mp4", "a red square moving left", "1e39")], [],
                                r"row 1 \(line 2\): score 1e39 is not a finite float32"),
    "misspelt label column": (["video", "prompt", "lable"], [("v0.mp4", "a red square moving left", "1")], [],
                              r"columns \['lable'\] are not recognised"),
    "duplicate rows": (["video", "prompt", "label"], [GOOD[0], GOOD[0]], [], r"row 2 \(line 3\): duplicate of row 1"),
    "contradicting labels": (["video", "prompt", "label"], [GOOD[0], ("v0.mp4", GOOD[0][1], "0")], [],
                             r"row 1 \(line 2\): contradicts row\(s\) \[2\]"),
    "a pair of one video with a winner": (["path_A", "path_B", "prompt", "Overall"],
                                          [("v0.mp4", "v0.mp4", "a red square moving left", "A")], [],
                                          "same video, yet one is labelled better"),
    "cut video behind an intact header": (["video", "prompt", "label"], [("cut.mp4", "a red square moving left", "1")],
                                          [], r"row 1 \(line 2\): too few decodable frames in .*cut.mp4"),
    "fps inf": (["video", "prompt", "label"], GOOD, ["--fps", "inf"], "argument --fps"),
    "frames not 4k+1": (["video", "prompt", "label"], GOOD, ["--num-frames", "8"], "--num-frames must be 4k\\+1"),
    "shard size 0": (["video", "prompt", "label"], GOOD, ["--shard-size", "0"], "argument --shard-size"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_input_is_named_and_the_old_dataset_is_kept(case, videos, binary_folder, tmp_path, monkeypatch, capsys):
    import re
    import shutil
    header, rows, flags, message = BAD_MANIFESTS[case]
    _cut_video(videos)
    manifest = videos / "bad.csv"
    if header is None:  # latin-1: an accented prompt on line 3
        manifest.write_bytes("video,prompt,label\nv0.mp4,a red square,1\nv1.mp4,un carré bleu,0\n".encode("latin-1"))
    else:
        _csv(manifest, header, rows)
    out = tmp_path / "data"
    shutil.copytree(binary_folder, out)  # a user's earlier dataset, which --overwrite must not lose on an error
    before = _hashes(out)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--input", str(manifest), "--out-dir", str(out), "--overwrite",
                                      *flags])
    with pytest.raises(SystemExit) as e:
        rundir.cli(prepare.main, prepare.Args, {})
    err = capsys.readouterr().err
    assert e.value.code == (2 if flags else 1), err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert _hashes(out) == before


def test_a_bom_manifest_reads_like_a_plain_one(videos, tmp_path):
    manifest = _csv(videos / "plain.csv", ["video", "prompt", "label"], GOOD[:2])
    bom = videos / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # what Excel writes
    a, b = _prepare(manifest, tmp_path / "a"), _prepare(bom, tmp_path / "b")
    assert a["rows"] == b["rows"] == 2
    assert torch.equal(dataset.load(tmp_path / "a")[0]["latents"], dataset.load(tmp_path / "b")[0]["latents"])


def test_on_duplicates_drop_keeps_the_first_and_reports_the_rest(videos, tmp_path):
    rows = [GOOD[0], GOOD[0], GOOD[1], ("v1.mp4", GOOD[1][1], "1"), GOOD[2]]  # a duplicate, a contradiction
    s = _prepare(_csv(videos / "dup.csv", ["video", "prompt", "label"], rows), tmp_path / "d", on_duplicates="drop")
    assert dataset.load(tmp_path / "d")[0]["row"].tolist() == [1, 5] and s["bad_rows"] == 3
    assert [b["row"] for b in json.loads((tmp_path / "d" / "bad_rows.json").read_text())] == [2, 3, 4]


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(videos, binary_folder, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "data"
    shutil.copytree(binary_folder, out)
    before = _hashes(out)
    manifest = _csv(videos / "new.csv", ["video", "prompt", "label"], GOOD[:4])
    real = common.encode_video
    calls = []
    def fail_on_the_second_shard(pipe, video):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")  # an error that shows only while encoding
        return real(pipe, video)
    monkeypatch.setattr(common, "encode_video", fail_on_the_second_shard)
    with pytest.raises(RuntimeError, match="out of memory"):
        _prepare(manifest, out, overwrite=True, shard_size=2)
    assert _hashes(out) == before  # the old dataset is whole and still loads
    assert dataset.load(out, "binary")[0]["row"].tolist() == [1, 2, 3, 4, 5]
    monkeypatch.setattr(common, "encode_video", real)
    s = _prepare(manifest, out, overwrite=True, shard_size=2)  # resumes the side folder, then swaps
    assert s["shards_skipped"] == 1 and dataset.load(out, "binary")[0]["row"].tolist() == [1, 2, 3, 4]
    assert not (tmp_path / "data.new").exists() and not (tmp_path / "data.old").exists()
