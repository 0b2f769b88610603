"""The real path, end to end, as a user with a GPU runs it, on the CPU: a diffusers Wan checkpoint *folder* (the tiny
backbone saved with save_pretrained), mp4 clips on disk at a size other than tiny's default, prepare.py for every
dataset kind, then every method script (its CLI entry point) through every stage with --backbone <folder> --data
<dataset> --max-steps 2 --eval-samples 2 --dtype bf16 (10 sampler steps, small batches: METHODS), and every saved
LoRA loaded into WanPipeline.from_pretrained(folder) to generate.
Nothing here uses the toy world's datasets: the scripts see what a real run sees."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import rundir
import toy

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SIZE = dict(height=48, width=64, num_frames=13)  # tiny's default is 32x32x9
SIZE_FLAGS = ["--height", "48", "--width", "64", "--num-frames", "13"]


def run(*argv, timeout=600):
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder backbone, 12 clips, and one prepared dataset of each kind."""
    d = tmp_path_factory.mktemp("real")
    backbone = d / "Wan-tiny-Diffusers"
    toy.build_tiny_pipeline().save_pretrained(backbone)
    videos = d / "videos"
    clips = toy.make_toy_clips(12, 17, 64, generator=torch.Generator().manual_seed(0))  # 64x64, 17 frames
    import imageio
    for i, clip in enumerate(clips):
        frames = ((clip.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        videos.mkdir(exist_ok=True)
        imageio.mimwrite(videos / f"c{i}.mp4", list(frames), fps=16, macro_block_size=16)
    prompts = toy.toy_prompts("train")
    rows = {
        "binary": (["video", "prompt", "label"], [(f"c{i}.mp4", prompts[i], i % 2) for i in range(12)]),
        "score": (["video", "prompt", "score"], [(f"c{i}.mp4", prompts[i], i / 12 - 0.5) for i in range(12)]),
        "pairs": (["path_A", "path_B", "prompt", "Overall"],
                  [(f"c{i}.mp4", f"c{(i + 1) % 12}.mp4", prompts[i], "AB"[i % 2] if i % 5 else "same")
                   for i in range(12)]),
        "sft": (["video", "prompt"], [(f"c{i}.mp4", prompts[i]) for i in range(4)]),
    }
    data = {}
    for kind, (header, body) in rows.items():
        manifest = videos / f"{kind}.csv"
        manifest.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in body]) + "\n")
        data[kind] = d / "data" / kind
        argv = ["--input", manifest, "--out-dir", data[kind], "--backbone", backbone, *SIZE_FLAGS,
                *(["--score-source", "human"] if kind == "score" else [])]
        if kind == "binary":  # `python prepare.py ...` as a user runs it
            run("prepare.py", *argv)
        else:  # the same parse and main, in this process: a process start (~8 s of imports) each buys nothing more
            prepare.main(rundir.parse_args(prepare.Args, {}, list(map(str, argv))))
        meta = json.loads((data[kind] / "meta.json").read_text())
        assert (meta["height"], meta["width"], meta["num_frames"]) == (48, 64, 13)
    prompts_txt = d / "prompts.txt"
    prompts_txt.write_text("\n".join(prompts[:6]) + "\n")
    return dict(backbone=backbone, data=data, prompts=prompts_txt, root=d)


def generate_with_lora(backbone, lora_dir):
    """What the README tells a user to do with a fine-tuned LoRA: load it into the diffusers pipeline, generate."""
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(backbone)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_dir)
    assert any("lora" in k for k in pipe.transformer.state_dict()) and before  # adapters attached
    out = pipe("a red square moving left", num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert out.shape[-3:] == (4, 6, 8) and torch.isfinite(out).all()  # 13 frames -> 4, 48x64 -> 6x8


COMMON = ["--max-steps", "2", "--eval-samples", "2", "--dtype", "bf16", "--save-videos", "1"]
# The paper's sampler steps (40 or 50, with CFG) and batches are most of each run on a CPU in bf16; 10 steps, one
# micro-batch and small batches run the same code. Measured: PRFL's 40 steps x 5 micro-batches were 55 s of its 65
# (20 s now); VELR's 50 steps with the gradient window at 15-25 (K = 10) 40 s of 65 (window at 3-5, K = 2); PRISM's 50
# steps and Best-of-5 at k = 1, 5, 10, 25, 50 (k = 50: the clean latent) 45 s of 78 (Best-of-2 at k = 1, 5, 10);
# DiNa-LRM's ReFL at its official 40 steps x 4 micro-batches of 16 prompts 2 of its 2.5 CPU minutes
METHODS = {
    "prfl": lambda w: ["--data", w["data"]["binary"], "--sft-data", w["data"]["sft"], "--num-steps", "10",
                       "--grad-accum", "1"],
    "velr": lambda w: ["--data", w["data"]["score"], "--prompts", w["prompts"], "--ensemble-size", "2",
                       "--num-steps", "10", "--mid-step", "3", "5", "--truncated-steps", "2", "--batch-size", "2"],
    "prism": lambda w: ["--data", w["data"]["pairs"], "--num-steps", "10", "--bon-steps", "1", "5", "10",
                        "--bon-n", "2", "--rm-batch", "4"],
    "dina_lrm": lambda w: ["--data", w["data"]["pairs"], "--num-steps", "10", "--grad-accum", "1", "--batch-size", "2",
                           "--rm-batch", "4"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_stage_on_a_folder_backbone_with_prepared_data(method, world, cli):
    """`python <method>.py --backbone <folder> --data <prepared> ...` through its entry point, in this process
    (conftest's `cli`: the ~8 s of imports a process start costs buy nothing more; tests/test_cli.py runs each script
    as a real process, and prepare.py runs as one in `world`)."""
    out = world["root"] / f"run-{method}"
    code, _, err = cli(method, ["--backbone", world["backbone"], *METHODS[method](world), *COMMON, "--out-dir", out])
    assert code == 0, err[-3000:]
    args = json.loads((out / "args.json").read_text())
    assert (args["height"], args["width"], args["num_frames"]) == (48, 64, 13)  # the data's size, not tiny's
    assert (out / "summary.json").is_file() and "error" not in err
    for lora in sorted(out.glob("**/pytorch_lora_weights.safetensors")):
        generate_with_lora(world["backbone"], lora.parent)
    if method != "prism":  # PRISM fine-tunes nothing: its product is the head and the Best-of-N samples
        assert list(out.glob("**/pytorch_lora_weights.safetensors")), "no LoRA saved"
    assert list((out / "videos").glob("*.mp4")), "no sample video written"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_size_that_conflicts_with_the_data_is_refused_before_loading(method, world, tmp_path, cli):
    # `python <method>.py ...` through its entry point, in this process (conftest's `cli`: no interpreter start-up)
    code, _, err = cli(method, ["--backbone", world["backbone"], *METHODS[method](world), "--height", "32",
                                "--out-dir", tmp_path / "run"])
    assert code != 0 and "Traceback" not in err
    assert "error:" in err and "48" in err and "--height" in err
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder
