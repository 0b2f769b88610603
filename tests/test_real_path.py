"""The real path, end to end, as a user with a GPU runs it, on the CPU: a diffusers Wan checkpoint *folder* (the tiny
backbone saved with save_pretrained), mp4 clips on disk at a size other than tiny's default, prepare.py for every
dataset kind, then every method script through every stage with --backbone <folder> --data <dataset> --max-steps 2
--eval-samples 2 --dtype bf16, and every saved LoRA loaded into WanPipeline.from_pretrained(folder) to generate.
Nothing here uses the toy world's datasets: the scripts see what a real run sees."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
        run("prepare.py", "--input", manifest, "--out-dir", data[kind], "--backbone", backbone, *SIZE_FLAGS,
            *(["--score-source", "human"] if kind == "score" else []))
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
METHODS = {
    "prfl": lambda w: ["--data", w["data"]["binary"], "--sft-data", w["data"]["sft"]],
    "velr": lambda w: ["--data", w["data"]["score"], "--prompts", w["prompts"], "--ensemble-size", "2"],
    "prism": lambda w: ["--data", w["data"]["pairs"]],
    # DiNa-LRM's ReFL at its official 40 steps x 4 micro-batches of 16 is 2 of this test's 2.5 CPU minutes (bf16 on a
    # CPU); 10 steps and one micro-batch run the same code
    "dina_lrm": lambda w: ["--data", w["data"]["pairs"], "--num-steps", "10", "--grad-accum", "1"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_stage_on_a_folder_backbone_with_prepared_data(method, world):
    out = world["root"] / f"run-{method}"
    r = run(f"{method}.py", "--backbone", world["backbone"], *METHODS[method](world), *COMMON, "--out-dir", out)
    args = json.loads((out / "args.json").read_text())
    assert (args["height"], args["width"], args["num_frames"]) == (48, 64, 13)  # the data's size, not tiny's
    assert (out / "summary.json").is_file() and "error" not in r.stderr
    for lora in sorted(out.glob("**/pytorch_lora_weights.safetensors")):
        generate_with_lora(world["backbone"], lora.parent)
    if method != "prism":  # PRISM fine-tunes nothing: its product is the head and the Best-of-N samples
        assert list(out.glob("**/pytorch_lora_weights.safetensors")), "no LoRA saved"
    assert list((out / "videos").glob("*.mp4")), "no sample video written"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_size_that_conflicts_with_the_data_is_refused_before_loading(method, world, tmp_path):
    r = subprocess.run([sys.executable, f"{method}.py", "--backbone", str(world["backbone"]),
                        *map(str, METHODS[method](world)), "--height", "32", "--out-dir", str(tmp_path / "run")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and "48" in r.stderr and "--height" in r.stderr
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder
