"""bench.py (`make bench`): one table of every method's steps next to the RGB ReFL baseline, from one run.

Rows: each stage of each method script, estimated by the script's own --estimate-memory (prfl, velr,
dina_lrm, prism: their own modules and losses, batch 1), then the generic LoRA transformer step and the RGB
ReFL baseline (one transformer step with gradient, then the VAE decode with gradient of all frames, or of the
first frame only as PRFL's comparison did; LoRA r64, bf16 VAE, estimate.transformer_step / rgb_refl_step).
Columns:
  * estimated peak GiB and TFLOPs per step for Wan2.1-1.3B at 480x832x81 and Wan2.1-14B at 720x1280x81: the
    real code on fake tensors (nothing allocated), bf16, LoRA, block gradient checkpointing, AdamW state.
    "(+n)": TFLOPs of the no-grad rollout forwards before the gradient window, counted but not run.
  * fits: the smallest of a 24 / 48 / 80 GB GPU with the peak + 1.5 GiB (CUDA context, workspaces, allocator).
  * measured on this CPU with real tensors of the tiny backbone (fp32, each script's tiny defaults): ms per
    step (3 steps after a warm-up) and the peak of live tensor bytes (MiB), by the same meter.
Offline, no weights, no GPU; the backbones run in 2 processes (--jobs).
Usage: OMP_NUM_THREADS=1 python bench.py [--backbones wan2.1-1.3b wan2.1-14b] [--jobs 2]
"""
import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import common
import rundir
import estimate
import dina_lrm
import prfl
import prism
import velr

METHODS = [("PRFL", prfl), ("VELR", velr), ("DiNa-LRM", dina_lrm), ("PRISM", prism)]


def reference_steps(backbone: str) -> dict:
    """The generic LoRA step and the RGB ReFL baseline (all frames / first frame) through estimate.StageEstimates."""
    with estimate.StageEstimates("baseline", backbone) as est:
        est.load_phase()  # what every script's start costs: load_backbone + encode_prompts
        pipe = est.build(lambda: est.pipeline(lora_rank=64, vae_dtype=est.dtype))
        x, e, _ = est.inputs()
        est.step("LoRA transformer step (flow matching)", estimate.transformer_step, pipe.transformer, x, e)
        for frames in ("all", "first"):
            est.step(f"RGB ReFL: decode {frames} frame{'s' if frames == 'all' else ''} with grad",
                     estimate.rgb_refl_step, pipe.transformer, pipe.vae, x, e, frames=frames)
    return est.results


def all_steps(backbone: str) -> list[tuple[str, str, dict]]:
    """(method, stage, estimate) of every row, in table order."""
    rows = []
    for name, module in METHODS:
        args = rundir.parse_args(module.Args, module.TINY, ["--backbone", backbone, "--estimate-memory"])
        results = module.main(args)
        rows += [(name, label, est) for label, est in results.items()]
    return rows + [("baseline", label, est) for label, est in reference_steps(backbone).items()]


def timed_steps(backbone: str, gpus: int = 8) -> tuple[list, float]:
    estimate.GPUS = gpus  # (a spawned process starts from the module's default)
    torch.set_num_threads(1)  # tiny CPU kernels: threads cost more than they save on a shared machine
    t0 = time.perf_counter()
    return all_steps(backbone), time.perf_counter() - t0


def tflops(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def fits(peak_gib: float) -> str:
    return next((f"{gpu} GB" for gpu in (24, 48, 80) if peak_gib + 1.5 <= gpu), "> 80 GB")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="*", default=["wan2.1-1.3b", "wan2.1-14b"])
    p.add_argument("--jobs", type=int, default=2, help="processes: the backbones run in parallel (1: in this one)")
    p.add_argument("--gpus", type=int, default=8, help="the N of the 14B per-GPU column (torchrun, FSDP2)")
    args = p.parse_args()
    estimate.GPUS = args.gpus  # the column's name
    backbones, t0 = args.backbones, time.perf_counter()
    todo = backbones[::-1] + ["tiny"]  # the slowest first
    if args.jobs > 1 and len(todo) > 1:  # its lines then interleave; each names its backbone
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = dict(zip(todo, pool.map(timed_steps, todo, [args.gpus] * len(todo))))
    else:
        done = {b: timed_steps(b, args.gpus) for b in todo}
    runs, seconds = {b: r for b, (r, _) in done.items()}, {b: s for b, (_, s) in done.items()}
    table = []
    for i, (method, label, _) in enumerate(runs[backbones[0]] if backbones else runs["tiny"]):
        row = {"method": method, "step (batch 1)": label}
        for b in backbones:
            est = runs[b][i][2]
            gib, rollout = est["peak_bytes"] / 2**30, est.get("rollout_flops", 0) / 1e12
            short = b.replace("wan2.1-", "").upper()
            row[f"{short} GiB"] = f"{gib:.1f}"
            row[f"{short} TFLOPs"] = tflops(est["flops"] / 1e12) + (f" (+{rollout:.0f})" if rollout else "")
            row[f"{short} fits"] = fits(gib)
            if b == "wan2.1-14b":  # under torchrun every rank loads the pipeline whole, then shards its blocks
                row[f"{short} GiB/GPU ({estimate.GPUS}x FSDP)"] = f"{est.get('per_gpu_bytes', est['peak_bytes']) / 2**30:.1f}"
        tiny = runs["tiny"][i][2]
        row["tiny CPU ms/step"] = f"{tiny['seconds_per_step'] * 1e3:.1f}" if "seconds_per_step" in tiny else "-"
        row["tiny peak MiB"] = f"{tiny['peak_bytes'] / 2**20:.2f}"
        table.append(row)
    print("\n" + rundir.format_table(table))
    print("\nseconds per backbone: " + ", ".join(f"{b} {s:.0f}" for b, s in seconds.items())
          + f"; total {time.perf_counter() - t0:.0f} s")


def random_wan_folder(out, backbone: str = "wan2.1-1.3b", text_layers: int | None = None):
    """A diffusers Wan folder with the real config of `backbone` and random weights (bf16 DiT and text encoder, fp32
    VAE; the byte-level tokenizer of the tiny backbone), for timing the real path where no weights can be downloaded.
    text_layers shrinks UMT5-XXL's 24 layers (its 1B-parameter embedding stays) to fit a small machine.
    Usage: python bench.py --random-folder DIR [--text-layers N]"""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    cfg = common.WAN_CONFIGS[backbone]
    te_cfg = dict(cfg["text_encoder"], **({"num_layers": text_layers} if text_layers else {}))
    torch.manual_seed(0)
    with torch.device("meta"):
        parts = dict(transformer=WanTransformer3DModel(**cfg["transformer"]), text_encoder=UMT5EncoderModel(UMT5Config(**te_cfg)))
    for name, dtype in (("transformer", torch.bfloat16), ("text_encoder", torch.bfloat16)):
        m = estimate.cast_like_from_pretrained(parts[name].to_empty(device="cpu"), dtype)
        for p in m.parameters():  # small random weights (the real init is irrelevant for timing and memory)
            torch.nn.init.normal_(p.data, std=0.02)
        parts[name] = m
    parts["text_encoder"].encoder.embed_tokens.weight = parts["text_encoder"].shared.weight  # to_empty untied them
    pipe = WanPipeline(tokenizer=ByT5Tokenizer(), vae=AutoencoderKLWan(**cfg["vae"]), scheduler=UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=cfg["flow_shift"]),
        **parts)
    pipe.save_pretrained(out)
    return out


if __name__ == "__main__":
    if "--random-folder" in sys.argv:
        i = sys.argv.index("--random-folder")
        layers = int(sys.argv[sys.argv.index("--text-layers") + 1]) if "--text-layers" in sys.argv else None
        print(random_wan_folder(sys.argv[i + 1], text_layers=layers))
    else:
        main()
