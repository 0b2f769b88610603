"""common.py: the small shared layer under prfl.py, velr.py, prism.py and dina_lrm.py.

Everything here is plumbing that three or more methods need and that is not a method itself:

    backbones      load_backbone(name) -> diffusers WanPipeline ("tiny" is built offline in memory),
                   WAN_CONFIGS (known real configs, for shapes and parameter counts without weights)
    text           encode_prompts(pipe, prompts) -> (embeds [P,L,D], mask [P,L]), computed once
    flow matching  shift_sigma, sigma_schedule, add_noise, velocity_target, x0_from_velocity,
                   euler_step, sample_train_sigma, predict_velocity
    rollout        rollout(transformer, x, embeds, sigmas, start, stop, grad_steps, cfg)
    DiT prefix     dit_prefix_features(transformer, x, timestep, embeds, taps) (stops after max(taps))
    LoRA           add_lora / save_lora (diffusers format, loads with WanPipeline.load_lora_weights)
    data           save_dataset / load_dataset (safetensors shards + meta.json), prompt tables
    toy world      toy_prompts, make_toy_clips, toy_reward, true_reward, build_toy_dataset
    plumbing       arg / parse_args (dataclass -> argparse), seed_everything, Run (run directory,
                   metrics.jsonl, summary.json), save_safetensors (atomic), export_video, mean_se
    estimator      estimate(fn, *args) / estimate_training_step: peak live bytes + FLOPs of real code
                   on fake tensors (real Wan configs, no weights); build_wan_transformer / build_wan_vae
                   (weightless inside fake_mode()), transformer_step and rgb_refl_step (the baseline);
                   StageEstimates: the scripts' --estimate-memory (and bench.py), checkpoint_with_adapter

Conventions (Wan2.1 / diffusers): sigma in [0, 1] with x_sigma = (1 - sigma) x0 + sigma eps, the
transformer's timestep is 1000 * sigma and it predicts the velocity eps - x0. Latents are the VAE's
normalised latents, [B, 16, F', H', W'] with F' = (frames - 1) // 4 + 1 and H' = H / 8.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import re
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------
# Configs of the real Wan2.1 text-to-video checkpoints (diffusers format), kept so that shapes,
# token counts, parameter counts and memory can be computed without downloading any weights.
_WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True])
WAN_CONFIGS = {
    "wan2.1-1.3b": dict(
        repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832, num_frames=81,
        max_sequence_length=512, flow_shift=3.0, vae=_WAN_VAE,
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                         in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                         num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                         eps=1e-6, rope_max_seq_len=1024)),
    "wan2.1-14b": dict(
        repo="Wan-AI/Wan2.1-T2V-14B-Diffusers", height=720, width=1280, num_frames=81,
        max_sequence_length=512, flow_shift=5.0, vae=_WAN_VAE,
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                         in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                         num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                         eps=1e-6, rope_max_seq_len=1024)),
    # 12 blocks so every method's paper default (8 or 12 blocks, taps 4/8/12) exists unchanged.
    # Inner dim 32 = 2 heads x 16 so the heads of PRFL (8) and DiNa (8) divide it.
    "tiny": dict(
        repo=None, height=32, width=32, num_frames=9, max_sequence_length=32, flow_shift=3.0,
        # is_residual (Wan2.2's average-pooling shortcuts in the same class) lets the tiny VAE learn to
        # reconstruct toy clips in minutes on a CPU; without them it sits at "background only" for long.
        vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, is_residual=True,
                 temperal_downsample=[False, True, True],
                 # replaced by the fitted VAE's latent statistics (tiny_wan.safetensors metadata)
                 latents_mean=[0.0] * 16, latents_std=[0.5] * 16),
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                         in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                         num_layers=12, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                         eps=1e-6, rope_max_seq_len=32),
        text_encoder=dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                          relative_attention_num_buckets=8)),
}


def backbone_config(name: str) -> dict:
    """The WAN_CONFIGS entry for a known name; for a folder / hub id, the 1.3B defaults."""
    return WAN_CONFIGS.get(name, WAN_CONFIGS["wan2.1-1.3b"])


# The tiny backbone's fitted weights (VAE, transformer, text encoder; 1 MB), made by `python common.py
# fit-tiny`. Random tiny components cannot show a reward method working: a random VAE's decode is
# unrelated to its input, so the "true" pixel reward of a latent is noise (see fit_tiny_world).
TINY_WEIGHTS = Path(__file__).resolve().with_name("tiny_wan.safetensors")


def build_tiny_pipeline(seed: int = 0, weights=TINY_WEIGHTS):
    """A real diffusers WanPipeline of tiny components, deterministic, offline, < 1 s.

    Built from WAN_CONFIGS["tiny"] with seed-`seed` random weights, then, if `weights` exists (the
    default tiny_wan.safetensors), loaded with the fitted toy-world weights; weights=None keeps it random.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from safetensors import safe_open
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    cfg = WAN_CONFIGS["tiny"]
    state, vae_cfg = {}, dict(cfg["vae"])
    if weights is not None and Path(weights).is_file():
        with safe_open(str(weights), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        # the fitted VAE's latent statistics, so that latents are normalised to ~unit scale
        vae_cfg.update(latents_mean=json.loads(meta["latents_mean"]), latents_std=json.loads(meta["latents_std"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**cfg["transformer"])
        vae = AutoencoderKLWan(**vae_cfg)
        text_encoder = UMT5EncoderModel(UMT5Config(**cfg["text_encoder"]))
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if part:
            module.load_state_dict(part)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=cfg["flow_shift"])
    # ByT5 is byte-level: it needs no vocabulary file, so the tiny pipeline has a real tokenizer.
    return WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer, scheduler=scheduler)


def load_backbone(name: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a WanPipeline: "tiny", "wan2.1-1.3b", "wan2.1-14b", a local folder or a hub id.

    The transformer runs in bf16 on CUDA and fp32 on CPU (or `dtype`); VAE and text encoder in fp32.
    """
    from diffusers import WanPipeline

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "tiny":
        pipe = build_tiny_pipeline()
    else:
        repo = WAN_CONFIGS[name]["repo"] if name in WAN_CONFIGS else name
        try:
            # transformer in `dtype`, everything else (VAE, text encoder) in fp32
            pipe = WanPipeline.from_pretrained(repo, dtype={"transformer": dtype, "default": torch.float32})
        except (OSError, ValueError) as e:  # hub unreachable / not cached / not a Wan folder
            raise SystemExit(
                f"could not load the Wan checkpoint '{repo}' ({type(e).__name__}).\n"
                f"Download it once where the Hugging Face hub is reachable, e.g.\n"
                f"    huggingface-cli download {repo} --local-dir checkpoints/{repo.split('/')[-1]}\n"
                f"then pass the folder: --backbone checkpoints/{repo.split('/')[-1]}") from None
    pipe.backbone_name = name
    if pipe.transformer.dtype != dtype:  # tiny on CUDA
        pipe.transformer.to(dtype=dtype)
    pipe.transformer.to(device)
    pipe.vae.to(device)
    if pipe.text_encoder is not None:
        pipe.text_encoder.to(device)
    pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False)
    return pipe


def backbone_geometry(pipe, height=None, width=None, num_frames=None) -> dict:
    """Video size (defaults from the backbone) and the latent shape and token count it gives."""
    cfg = backbone_config(getattr(pipe, "backbone_name", "tiny"))
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    if (f - 1) % st or h % (ss * 2) or w % (ss * 2):
        raise ValueError(f"video {f}x{h}x{w}: frames must be {st}k+1 and height/width multiples of {ss * 2}")
    shape = (pipe.transformer.config.in_channels, (f - 1) // st + 1, h // ss, w // ss)
    p = pipe.transformer.config.patch_size
    tokens = shape[1] // p[0] * shape[2] // p[1] * shape[3] // p[2]
    return dict(height=h, width=w, num_frames=f, latent_shape=shape, tokens=tokens,
                max_sequence_length=cfg["max_sequence_length"])


# ----------------------------------------------------------------------------------------------
# Text: encode every prompt once; training never needs the text encoder afterwards.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int | None = None, batch_size: int = 16):
    """T5 embeddings [P, L, D] (zero-padded past each prompt, as Wan does) and the mask [P, L]."""
    L = max_sequence_length or backbone_geometry(pipe)["max_sequence_length"]
    if pipe.text_encoder is None:
        raise RuntimeError("the text encoder was already dropped: encode prompts before training")
    embeds, masks = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        e = pipe._get_t5_prompt_embeds(chunk, max_sequence_length=L, device=pipe.text_encoder.device,
                                       dtype=torch.float32)
        ids = pipe.tokenizer(chunk, padding="max_length", max_length=L, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        embeds.append(e.cpu())
        masks.append(ids.attention_mask.bool())
    return torch.cat(embeds), torch.cat(masks)


def drop_text_encoder(pipe):
    """Free the text encoder (UMT5-XXL: about 21 GiB in fp32 for real Wan) once all prompts are cached."""
    pipe.text_encoder = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Flow matching (rectified flow, as Wan is trained), one line each, differentiable.
# ----------------------------------------------------------------------------------------------
def shift_sigma(s, shift: float):
    """Timestep shift s' = shift*s / (1 + (shift-1)*s): spends more steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """N+1 sigmas from 1 to 0 (shifted); step i goes from sigmas[i] to sigmas[i+1]."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def add_noise(x0, eps, sigma):
    """x_sigma = (1 - sigma) x0 + sigma eps (sigma broadcast over [B])."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0, eps):
    """The flow-matching regression target v = eps - x0."""
    return eps - x0


def x0_from_velocity(x_t, v, sigma):
    """x0 = x_sigma - sigma v (exact for the straight path)."""
    return x_t - _bcast(sigma, x_t) * v


def euler_step(x, v, sigma, sigma_next):
    """One Euler step of the flow ODE: x + (sigma_next - sigma) v."""
    return x + (_bcast(sigma_next, x) - _bcast(sigma, x)) * v


def sample_train_sigma(batch: int, shift: float = 1.0, generator=None, device="cpu") -> torch.Tensor:
    """sigma = shift(u), u uniform on the 1000-point training grid (shift 1: uniform sigma)."""
    u = torch.randint(1, 1001, (batch,), generator=generator).float() / 1000
    return shift_sigma(u, shift).to(device)


def _bcast(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


def predict_velocity(transformer, x, sigma, embeds):
    """The generator's velocity v(x, sigma, text) in fp32; sigma is a float or a [B] tensor."""
    dtype = transformer.dtype
    t = (torch.as_tensor(sigma, device=x.device, dtype=torch.float32) * 1000).expand(x.shape[0])
    out = transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                      return_dict=False)[0]
    return out.float()


# ----------------------------------------------------------------------------------------------
# Rollout with a gradient window
# ----------------------------------------------------------------------------------------------
def rollout(transformer, x, embeds, sigmas, start: int = 0, stop: int | None = None, grad_steps=(),
            guidance_scale: float = 1.0, negative_embeds=None, progress: bool = False):
    """Denoise x from sigmas[start] to sigmas[stop] with Euler steps; return (x, v of the last step).

    The transformer is called with autograd on only for the step indices in `grad_steps` (the
    window): outside it, the velocity is computed under no_grad, so gradient reaches the generator
    only through the window's steps (the Euler update itself stays differentiable in x).
    With guidance_scale > 1, classifier-free guidance with `negative_embeds` (one batched call).
    Block gradient checkpointing applies inside the window when enabled on the transformer.
    """
    stop = len(sigmas) - 1 if stop is None else stop
    grad_steps = set(grad_steps)
    v = None
    for i in tqdm(range(start, stop), desc="rollout", leave=False, disable=not progress):
        with torch.set_grad_enabled(i in grad_steps and torch.is_grad_enabled()):
            if guidance_scale > 1.0:
                v_c, v_u = predict_velocity(transformer, torch.cat([x, x]), sigmas[i],
                                            torch.cat([embeds, negative_embeds])).chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            else:
                v = predict_velocity(transformer, x, sigmas[i], embeds)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x, v


@torch.no_grad()
def sample_latents(pipe, embeds, seeds: list[int], num_steps: int = 20, shift: float | None = None,
                   guidance_scale: float = 1.0, negative_embeds=None, batch_size: int = 16):
    """Fresh samples (no gradient) from fixed seeds: one latent per (embedding row, seed)."""
    geo = backbone_geometry(pipe)
    dev = pipe.transformer.device
    sigmas = sigma_schedule(num_steps, shift or backbone_config(getattr(pipe, "backbone_name", "tiny"))["flow_shift"])
    out = []
    for i in range(0, len(seeds), batch_size):
        e = embeds[i:i + batch_size].to(dev)
        noise = torch.stack([torch.randn(geo["latent_shape"], generator=torch.Generator().manual_seed(s))
                             for s in seeds[i:i + batch_size]]).to(dev)
        neg = None if negative_embeds is None else negative_embeds.expand(len(e), -1, -1).to(dev)
        out.append(rollout(pipe.transformer, noise, e, sigmas, guidance_scale=guidance_scale,
                           negative_embeds=neg)[0].cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# DiT prefix features: the transformer's own embeddings, then only its first blocks
# ----------------------------------------------------------------------------------------------
def dit_prefix_features(transformer, x, timestep, embeds, taps=(8,)):
    """Run patch/rope/condition embeddings and blocks[:max(taps)] (the rest never runs).

    Returns dict(hidden=[h after block k for k in taps] each [B, N, D], text=[B, L, D] embedded text
    tokens, temb=[B, D] timestep embedding, grid=(F', H'/2, W'/2) token grid in raster order).
    `timestep` is on the 0..1000 scale. Block gradient checkpointing is used when it is enabled
    on the transformer and autograd is on, as in the transformer's own forward.
    """
    tr = transformer
    if max(taps) > len(tr.blocks):
        raise ValueError(f"tap {max(taps)} > {len(tr.blocks)} blocks")
    dtype = tr.dtype
    x = x.to(dtype)
    rotary = tr.rope(x)
    h = tr.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
    t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).expand(x.shape[0])
    temb, tproj, text, _ = tr.condition_embedder(t, embeds.to(dtype), None)
    tproj = tproj.unflatten(1, (6, -1))
    hidden, ckpt = [], torch.is_grad_enabled() and tr.gradient_checkpointing
    for k, block in enumerate(tr.blocks[:max(taps)], start=1):
        h = tr._gradient_checkpointing_func(block, h, text, tproj, rotary) if ckpt else block(h, text, tproj, rotary)
        if k in taps:
            hidden.append(h)
    p = tr.config.patch_size
    grid = (x.shape[2] // p[0], x.shape[3] // p[1], x.shape[4] // p[2])
    return dict(hidden=hidden, text=text, temb=temb, grid=grid)


# ----------------------------------------------------------------------------------------------
# LoRA (peft through diffusers), saved in the diffusers format
# ----------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections of attn1 and attn2


def add_lora(transformer, rank: int, alpha: float | None = None, adapter_name: str = "default",
             blocks: list[int] | None = None, targets=LORA_TARGETS):
    """Attach a (named) LoRA adapter; base weights stay frozen. `blocks` restricts it to those blocks.

    LoRA params are kept in fp32 even when the base runs in bf16 (diffusers' cast_training_params).
    """
    from peft import LoraConfig

    if blocks is None:
        target = targets
    else:  # a regex: peft matches it against the full module name
        target = rf"blocks\.({'|'.join(map(str, blocks))})\.attn[12]\.({'|'.join(re.escape(t) for t in targets)})"
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                                       target_modules=target), adapter_name=adapter_name)
    params = [p for n, p in transformer.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(transformer, adapter_name: str = "default") -> dict:
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def save_lora(transformer, out_dir, adapter_name: str = "default"):
    """Write out_dir/pytorch_lora_weights.safetensors: WanPipeline.load_lora_weights(out_dir) loads it."""
    from diffusers import WanPipeline
    # the adapter's config (alpha!) goes into the file's metadata, or it would reload with alpha = r
    WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=lora_state_dict(transformer, adapter_name),
                                  transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------
# Data: a latent dataset is a folder of safetensors shards + meta.json
# ----------------------------------------------------------------------------------------------
# Per-row tensors share dim 0; prompts are stored once: prompt_embeds [P, L, D], prompt_mask [P, L],
# and each row has prompt_idx [N]. meta.json has {"kind", "prompts": [P strings], ...}.
# kinds: "binary" (latents, label), "score" (latents, score), "pairs" (latents_a, latents_b, pref
# with 0 = A better, 1 = B better, 2 = tie), "prompts" (only the prompt table; latents optional).
GiB = 2**30
DATASET_KEYS = {"binary": ("latents", "label"), "score": ("latents", "score"),
                "pairs": ("latents_a", "latents_b", "pref"), "prompts": ()}
PROMPT_KEYS = ("prompt_embeds", "prompt_mask")


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Atomic write: a temp file in the same folder, then rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def save_json(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def save_dataset(folder, tensors: dict, meta: dict, shard: int = 0):
    """Write one shard (shard-00000.safetensors) and meta.json; the prompt table goes in prompts.safetensors."""
    folder = Path(folder)
    rows = {k: v for k, v in tensors.items() if k not in PROMPT_KEYS}
    save_safetensors({k: tensors[k] for k in PROMPT_KEYS}, folder / "prompts.safetensors")
    save_safetensors(rows, folder / f"shard-{shard:05d}.safetensors")
    save_json(meta, folder / "meta.json")


def load_dataset(folder, kind: str | None = None) -> tuple[dict, dict]:
    """Load and validate a dataset folder; every problem is reported with the file and the key."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: not a dataset folder (no meta.json); make one with the toy world "
                                f"or the preparation step")
    meta = json.loads((folder / "meta.json").read_text())
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{folder}/meta.json: kind is '{meta.get('kind')}', this method needs '{kind}'")
    prompts = load_file(str(folder / "prompts.safetensors"))
    shards = sorted(folder.glob("shard-*.safetensors"))
    parts = [load_file(str(s)) for s in shards]
    data = {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}
    data.update(prompts)
    need = DATASET_KEYS[meta["kind"]] + ("prompt_idx",) * bool(DATASET_KEYS[meta["kind"]]) + PROMPT_KEYS
    for k in need:
        if k not in data:
            raise ValueError(f"{folder}: key '{k}' missing (a '{meta['kind']}' dataset needs {need})")
    per_row = [k for k in data if k not in PROMPT_KEYS]  # a "prompts" dataset may have no per-row tensors
    row_key = per_row[0] if per_row else "prompt_embeds"
    n = len(data[row_key])
    if n == 0:
        raise ValueError(f"{folder}: the dataset is empty")
    for k, v in data.items():
        if k in per_row and len(v) != n:
            raise ValueError(f"{folder}: '{k}' has {len(v)} rows, '{row_key}' has {n}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = (~torch.isfinite(v.flatten(1) if v.ndim > 1 else v[:, None])).any(1).nonzero()[:5, 0].tolist()
            raise ValueError(f"{folder}: '{k}' has NaN/inf values (rows {bad})")
    if "prompt_idx" in data and data["prompt_idx"].max() >= len(data["prompt_embeds"]):
        raise ValueError(f"{folder}: prompt_idx points past the {len(data['prompt_embeds'])} prompts")
    if len(meta.get("prompts", [])) != len(data["prompt_embeds"]):
        raise ValueError(f"{folder}/meta.json: {len(meta.get('prompts', []))} prompts listed, "
                         f"prompts.safetensors holds {len(data['prompt_embeds'])}")
    return data, meta


def check_latent_shape(latents, pipe, where: str):
    """Fail early when a dataset's latents do not fit the backbone (e.g. made for another one)."""
    c = pipe.transformer.config.in_channels
    if latents.ndim != 5 or latents.shape[1] != c:
        raise ValueError(f"{where}: latents have shape {tuple(latents.shape)}, the backbone needs [N, {c}, F', H', W']")
    p = pipe.transformer.config.patch_size
    if latents.shape[3] % p[1] or latents.shape[4] % p[2]:
        raise ValueError(f"{where}: latent height/width {tuple(latents.shape[3:])} not divisible by the patch {p[1:]}")


def split_indices(n: int, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(n * test_fraction)))
    return perm[k:], perm[:k]


# ----------------------------------------------------------------------------------------------
# Toy world: coloured squares that move; a differentiable pixel-space reward of prompt AND motion
# ----------------------------------------------------------------------------------------------
TOY_COLOURS = {"red": 0, "green": 1, "blue": 2}
TOY_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
TOY_SHAPES = ["square", "block", "box", "patch"]


def toy_prompts(split: str = "train") -> list[str]:
    """48 prompts "a <colour> <shape> moving <direction>"; the 'patch' ones are held out for evaluation."""
    shapes = TOY_SHAPES[:3] if split == "train" else TOY_SHAPES[3:]
    return [f"a {c} {s} moving {d}" for s in shapes for c in TOY_COLOURS for d in TOY_DIRECTIONS]


def parse_toy_prompt(prompt: str) -> tuple[int, tuple[float, float]]:
    words = prompt.lower().split()
    colour = [TOY_COLOURS[w] for w in words if w in TOY_COLOURS]
    direction = [TOY_DIRECTIONS[w] for w in words if w in TOY_DIRECTIONS]
    if not colour or not direction:
        raise ValueError(f"toy prompt '{prompt}' names no colour {list(TOY_COLOURS)} or direction {list(TOY_DIRECTIONS)}")
    return colour[0], direction[0]


def make_toy_clips(n: int, frames: int = 9, size: int = 32, generator=None, return_labels: bool = False,
                   colours: torch.Tensor | None = None):
    """n clips [n, 3, F, H, W] in [-1, 1]: a square of a random colour moving in a random direction.
    `colours` [n] (indices into TOY_COLOURS) fixes the colours. With return_labels, also the colour index [n]
    and direction index [n] (into TOY_COLOURS / TOY_DIRECTIONS)."""
    g = generator or torch.Generator().manual_seed(0)
    video = torch.full((n, 3, frames, size, size), -0.8)
    side = max(2, size // 4)
    colours_given, colours, directions = colours, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        colours[i], directions[i] = torch.randint(0, 3, (1,), generator=g), torch.randint(0, 4, (1,), generator=g)
        if colours_given is not None:
            colours[i] = colours_given[i]
        colour = torch.full((3,), -1.0)
        colour[colours[i]] = 1.0
        dx, dy = list(TOY_DIRECTIONS.values())[directions[i]]
        speed = size / 16 * (0.5 + torch.rand(1, generator=g).item())
        x0, y0 = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        x0, y0 = x0 - dx * speed * (frames - 1) / 2, y0 - dy * speed * (frames - 1) / 2
        for f in range(frames):
            x, y = int(round(x0 + dx * speed * f)), int(round(y0 + dy * speed * f))
            video[i, :, f, max(0, y - side // 2):max(0, y + side // 2), max(0, x - side // 2):max(0, x + side // 2)] = colour[:, None, None]
    return (video, colours, directions) if return_labels else video


def toy_reward(video: torch.Tensor, prompts: list[str], temperature: float = 0.05) -> torch.Tensor:
    """Differentiable reward [B] of videos [B, 3, F, H, W] in [-1, 1] for their prompts, about [-1, 2].

    colour: a soft-max over pixels of how much the prompt's colour channel exceeds the others (about [-1, 1]);
    motion: the displacement of that colour's soft centre of mass from the first to the last frame along the
    prompt's direction (tanh, [-1, 1]), counted only as far as the colour is present: without the square
    there is nothing to move, and the soft centre of mass of a background would follow decoding artefacts.
    One frame cannot score the motion term.
    """
    B, _, Fr, H, W = video.shape
    cols, dirs = zip(*(parse_toy_prompt(p) for p in prompts))
    onehot = F.one_hot(torch.tensor(cols, device=video.device), 3).to(video.dtype)[:, :, None, None, None]
    match = (video * onehot).sum(1) - (video * (1 - onehot)).sum(1) / 2          # [B, F, H, W]
    w = torch.softmax(match.flatten(2) / temperature, -1).view(B, Fr, H, W)
    colour = (w * match).sum((-1, -2)).mean(1) / 2
    ys = torch.linspace(-1, 1, H, device=video.device, dtype=video.dtype)
    xs = torch.linspace(-1, 1, W, device=video.device, dtype=video.dtype)
    cx, cy = (w.sum(2) * xs).sum(-1), (w.sum(3) * ys).sum(-1)                    # [B, F]
    d = torch.tensor(dirs, device=video.device, dtype=video.dtype)
    motion = torch.tanh(2 * ((cx[:, -1] - cx[:, 0]) * d[:, 0] + (cy[:, -1] - cy[:, 0]) * d[:, 1]))
    return colour + colour.clamp(0, 1) * motion


def encode_video(pipe, video: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] -> normalised latents (posterior mean), as the pipeline does."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(video), batch_size):
            z = vae.encode(video[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
            out.append((z - mean) / std)
    return torch.cat(out)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> videos [B, 3, F, H, W] in [-1, 1]; differentiable (pixel ReFL uses it).
    `pipe` is a WanPipeline or its VAE."""
    vae = getattr(pipe, "vae", pipe)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
    return vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


def true_reward(pipe, latents: torch.Tensor, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
    """The toy world's ground truth for a latent: decode with the VAE, then the pixel toy reward."""
    with torch.no_grad():
        return torch.cat([toy_reward(decode_latents(pipe, latents[i:i + batch_size].to(pipe.vae.device)),
                                     prompts[i:i + batch_size]).cpu()
                          for i in range(0, len(latents), batch_size)])


TOY_GOOD = 0.5  # binary toy label: reward above it = the prompt's colour is clearly there, not moving the wrong way


def build_toy_dataset(pipe, kind: str, n: int, seed: int = 0, generated_fraction: float = 0.5,
                      tie_margin: float = 0.1, num_steps: int = 10) -> tuple[dict, dict]:
    """A toy latent dataset of `kind` ("binary" | "score" | "pairs" | "prompts"), same layout as real data.

    Latents: half encoded synthetic clips, half sampled from the tiny generator (so reward models also
    see the generator's own distribution). A clip has its prompt's colour half the time (else a random one),
    like captions that are partly right. Labels come from true_reward: score = reward, label = reward above
    TOY_GOOD, pref = which of a same-prompt pair scores higher (tie within `tie_margin`). Needs the text
    encoder (prompts are encoded here).
    """
    g = torch.Generator().manual_seed(seed)
    prompts = toy_prompts("train")
    embeds, mask = encode_prompts(pipe, prompts)
    geo = backbone_geometry(pipe)
    prompt_colour = torch.tensor([parse_toy_prompt(p)[0] for p in prompts])

    def latents_for(idx, offset):  # row j is a latent for prompts[idx[j]]
        m = len(idx)
        gen_rows = torch.randperm(m, generator=g)[:int(round(m * generated_fraction))].sort().values
        clip_rows = torch.tensor(sorted(set(range(m)) - set(gen_rows.tolist())), dtype=torch.long)
        right = torch.rand(len(clip_rows), generator=g) < 0.5
        colours = torch.where(right, prompt_colour[idx[clip_rows]], torch.randint(0, 3, (len(clip_rows),), generator=g))
        z = torch.zeros(m, *geo["latent_shape"])
        if len(clip_rows):
            clips = make_toy_clips(len(clip_rows), geo["num_frames"], geo["height"], generator=g, colours=colours)
            z[clip_rows] = encode_video(pipe, clips)
        if len(gen_rows):
            z[gen_rows] = sample_latents(pipe, embeds[idx[gen_rows]], [seed * 100003 + offset + i for i in gen_rows.tolist()],
                                         num_steps=num_steps)
        return z

    prompt_idx = torch.randint(0, len(prompts), (n,), generator=g)
    names = [prompts[i] for i in prompt_idx]
    tensors = dict(prompt_embeds=embeds, prompt_mask=mask, prompt_idx=prompt_idx)
    if kind in ("binary", "score"):
        z = latents_for(prompt_idx, 0)
        r = true_reward(pipe, z, names)
        tensors.update(latents=z, score=r) if kind == "score" else tensors.update(latents=z, label=(r > TOY_GOOD).float())
    elif kind == "pairs":
        za, zb = latents_for(prompt_idx, 0), latents_for(prompt_idx, 10**6)
        ra, rb = true_reward(pipe, za, names), true_reward(pipe, zb, names)
        pref = torch.where(ra - rb > tie_margin, 0, torch.where(rb - ra > tie_margin, 1, 2))
        tensors.update(latents_a=za, latents_b=zb, pref=pref, reward_a=ra, reward_b=rb)
    elif kind == "prompts":
        tensors.update(latents=latents_for(prompt_idx, 0))
    else:
        raise ValueError(f"unknown dataset kind '{kind}' (one of {list(DATASET_KEYS)})")
    meta = dict(kind=kind, prompts=prompts, source="toy", n=n, seed=seed, backbone="tiny", **{
        k: geo[k] for k in ("height", "width", "num_frames")})
    return tensors, meta


def toy_dataset(pipe, kind: str, n: int, seed: int = 0, cache_dir="runs/toy_data", **kw) -> tuple[dict, dict]:
    """build_toy_dataset, cached on disk under cache_dir/<kind>-<n>-<seed>-<weights hash>/ (safetensors).
    The hash of toy_reward's source and of the tiny VAE and transformer weights keeps a cache from an older
    reward or fit from being reused."""
    import hashlib
    import inspect
    h = hashlib.sha1(inspect.getsource(toy_reward).encode())  # labels follow the reward: a new one, a new cache
    for p in [*pipe.vae.parameters(), *pipe.transformer.parameters()]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    folder = Path(cache_dir) / f"{kind}-{n}-{seed}-{h.hexdigest()[:8]}"
    if (folder / "meta.json").is_file():
        return load_dataset(folder, kind)
    tensors, meta = build_toy_dataset(pipe, kind, n, seed, **kw)
    save_dataset(folder, tensors, meta)
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# Fitting the tiny world once (python common.py fit-tiny -> tiny_wan.safetensors, ~25 min on 1 CPU core)
# ----------------------------------------------------------------------------------------------
# Why: with random tiny components nothing can be shown. A random VAE's decode(encode(clip)) is
# uncorrelated with the clip, so the true reward of a latent is noise that no latent reward model can
# learn; a random generator's features carry nothing for a frozen-backbone head. So, in three stages:
#   1. the VAE is fitted as an autoencoder of toy clips, and its latent statistics become latents_mean /
#      latents_std (as the real Wan VAE ships them);
#   2. the generator (transformer + T5) is pretrained by flow matching on encoded toy clips whose captions
#      are right only `caption_accuracy` of the time, per attribute: like web captions, they make the
#      generator follow its prompt only partly, which leaves reward fine-tuning something to improve.
def _toy_text_embeds(pipe, prompts: list[str]):
    """encode_prompts with gradient into the text encoder (padding zeroed, as Wan does)."""
    L = WAN_CONFIGS["tiny"]["max_sequence_length"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True,
                         return_tensors="pt")
    return pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state * ids.attention_mask[..., None]


def fit_tiny_world(out=TINY_WEIGHTS, vae_steps: int = 1500, generator_steps: int = 2500,
                   caption_accuracy: float = 0.5, seed: int = 0):
    """Fit the tiny VAE, transformer and text encoder on the toy world; save them to `out` (safetensors)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    pipe = build_tiny_pipeline(seed, weights=None)
    geo = backbone_geometry(pipe)
    F_, S = geo["num_frames"], geo["height"]

    def cosine(opt, steps):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))

    # 1. VAE: reconstruction weighted to the square (~6% of the pixels) plus the same error on 2x, 4x and 8x
    #    average-pooled frames, whose gradient says "right colour, roughly here" before the square is sharp
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(  # constant, then a cosine decay over the last 40%
        opt, lambda s: 1.0 if s < 0.6 * vae_steps else 0.5 * (1 + math.cos(math.pi * (s / vae_steps - 0.6) / 0.4)))
    for step in (bar := tqdm(range(vae_steps), desc="fit VAE")):
        clips = make_toy_clips(8, F_, S, generator=g)
        rec = vae.decode(vae.encode(clips).latent_dist.mean).sample
        weight = 1 + 9 * (clips > -0.8).any(1, keepdim=True).float()
        loss = (weight * (rec - clips).square()).mean() + sum(
            k * (F.avg_pool3d(rec, (1, k, k)) - F.avg_pool3d(clips, (1, k, k))).square().mean() for k in (2, 4, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    clips, colours, directions = make_toy_clips(3072, F_, S, generator=g, return_labels=True)
    with torch.no_grad():
        mu = torch.cat([vae.encode(clips[i:i + 64]).latent_dist.mean for i in range(0, len(clips), 64)])
    mean, std = mu.mean((0, 2, 3, 4)), mu.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    # 2. generator: flow matching on (latent, noisy caption); 10% empty captions (for CFG / PRFL's SFT)
    colour_names, direction_names = list(TOY_COLOURS), list(TOY_DIRECTIONS)
    vocab = [f"a {c} {s} moving {d}" for s in TOY_SHAPES for c in colour_names for d in direction_names] + [""]
    tr, te = pipe.transformer.train().requires_grad_(True), pipe.text_encoder.train().requires_grad_(True)
    opt = torch.optim.Adam([*tr.parameters(), *te.parameters()], 1e-3)
    sched = cosine(opt, generator_steps)
    n = len(latents)
    for step in (bar := tqdm(range(generator_steps), desc="fit generator")):
        idx = torch.randint(0, n, (64,), generator=g)
        wrong_c = torch.rand(64, generator=g) > caption_accuracy
        wrong_d = torch.rand(64, generator=g) > caption_accuracy
        c = torch.where(wrong_c, torch.randint(0, 3, (64,), generator=g), colours[idx])
        d = torch.where(wrong_d, torch.randint(0, 4, (64,), generator=g), directions[idx])
        s = torch.randint(0, len(TOY_SHAPES), (64,), generator=g)
        p = (s * 12 + c * 4 + d).masked_fill(torch.rand(64, generator=g) < 0.1, len(vocab) - 1)
        embeds = _toy_text_embeds(pipe, vocab)[p]
        x0, eps = latents[idx], torch.randn(64, *latents.shape[1:], generator=g)
        sigma = torch.rand(64, generator=g)
        loss = (predict_velocity(tr, add_noise(x0, eps, sigma), sigma, embeds) - velocity_target(x0, eps)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    tr.eval().requires_grad_(False)
    te.eval().requires_grad_(False)

    state = {f"{name}.{k}": v.detach().clone().contiguous() for name, m in
             (("transformer", tr), ("vae", vae), ("text_encoder", te)) for k, v in m.state_dict().items()}
    save_safetensors(state, out, metadata=dict(
        latents_mean=json.dumps(mean.tolist()), latents_std=json.dumps(std.tolist()),
        fit=json.dumps(dict(vae_steps=vae_steps, generator_steps=generator_steps,
                            caption_accuracy=caption_accuracy, seed=seed))))
    return pipe


# ----------------------------------------------------------------------------------------------
# Plumbing: args, seeding, run directory, logging, timing, statistics
# ----------------------------------------------------------------------------------------------
def arg(default, help: str, **kw):
    """A dataclass field with its --help text (every Args field uses this)."""
    factory = kw.pop("factory", None)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=dict(help=help, **kw))
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


def parse_args(cls, argv=None):
    """dataclass -> argparse: --field-name for every field, its help and default shown."""
    p = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.name.replace("_", "-")
        kw = dict(default=default, help=f.metadata.get("help", ""))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, (list, tuple)):
            p.add_argument(name, nargs="*", type=type(default[0]) if default else str, **kw)
        else:
            p.add_argument(name, type=type(default) if default is not None else str, **kw)
    ns = p.parse_args(argv)
    return cls(**vars(ns))


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


class Run:
    """runs/<method>-<backbone>-<time>/ with args.json, metrics.jsonl, summary.json, checkpoints, samples."""

    def __init__(self, method: str, args, out_dir: str | None = None):
        backbone = Path(str(getattr(args, "backbone", "tiny"))).name
        self.dir = Path(out_dir or f"runs/{method}-{backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir.mkdir(parents=True, exist_ok=True)
        save_json(dataclasses.asdict(args), self.dir / "args.json")
        self.metrics = open(self.dir / "metrics.jsonl", "a")

    def log(self, step: int, stage: str, **values):
        row = dict(step=step, stage=stage, time=round(time.time(), 3),
                   **{k: (v.item() if torch.is_tensor(v) else v) for k, v in values.items()})
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def summary(self, summary: dict):
        save_json(summary, self.dir / "summary.json")


class StepTimer:
    """Seconds per step and peak memory (CUDA allocator peak, or the process's peak RSS on CPU)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.times = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self.t0)

    @property
    def seconds_per_step(self) -> float:
        t = self.times[1:] or self.times  # the first step pays for warm-up
        return sum(t) / max(1, len(t))

    def peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else 0.0


def export_video(video: torch.Tensor, path, fps: int = 8):
    """One video [3, F, H, W] in [-1, 1] -> mp4 (diffusers' export_to_video, imageio-ffmpeg)."""
    from diffusers.utils import export_to_video
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    return path


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain markdown table (also valid for the README)."""
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in cells])



# ----------------------------------------------------------------------------------------------
# Memory and FLOPs at real scale without a GPU: the real code on fake tensors
# ----------------------------------------------------------------------------------------------
def fake_mode() -> FakeTensorMode:
    """Tensors (and models) made inside `with fake_mode():` have shapes, dtypes, devices, no data."""
    return FakeTensorMode()


# FlopCounterMode's formulas cover the CUDA attention kernels; on (fake) CPU tensors SDPA runs the CPU
# flash kernel, whose FLOPs are the same. FlopCounterMode itself is not used: the hooks of its module
# tracker keep tensors alive that block checkpointing would free (measured: a 4-block 1.3B LoRA step
# peaks at 14.2 GiB inside it, 5.5 GiB without it).
_FLOP_FORMULAS = {
    **flop_counter.flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_backward_flop_count(
            g.shape, q.shape, k.shape, v.shape),
}


class MemoryFlopMeter(TorchDispatchMode):
    """Peak of live tensor-storage bytes and FLOPs of every op run inside it (real or fake tensors).

    Memory: +size when an op first returns a storage, -size when PyTorch frees it (a weakref callback
    on the storage). Storages are keyed by identity, so views cost nothing. FLOPs: PyTorch's own
    formulas (torch.utils.flop_counter: matmuls, convolutions, attention; elementwise ops count 0).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.flops = {}                      # op name -> FLOPs
        self._seen = WeakIdKeyDictionary()   # storage -> its weakref (whose callback frees the bytes)

    def track(self, t: torch.Tensor):
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = weakref.ref(st, lambda _, n=n: self._free(n))
        self.live += n
        self.peak = max(self.peak, self.live)

    def _free(self, n: int):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            name = str(func._overloadpacket)
            self.flops[name] = self.flops.get(name, 0) + formula(*args, **kwargs, out_val=out)
        if isinstance(out, (torch.Tensor, list, tuple)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out


def _live_tensors(obj, weights: list, inputs: list):
    """Sort what an argument keeps alive into weights (module parameters, buffers, grads) and inputs."""
    if isinstance(obj, torch.nn.Module):
        weights += [p for p in obj.parameters()] + [p.grad for p in obj.parameters() if p.grad is not None]
        weights += list(obj.buffers())
    elif isinstance(obj, torch.optim.Optimizer):
        inputs += [t for s in obj.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    elif isinstance(obj, torch.Tensor):
        inputs.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _live_tensors(o, weights, inputs)
    elif isinstance(obj, dict):
        for o in obj.values():
            _live_tensors(o, weights, inputs)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def estimate(fn, *args, **kwargs) -> dict:
    """Run fn(*args, **kwargs) once, tracking the peak of live tensor bytes and counting FLOPs.

    Live at the start: the distinct storages reachable from the arguments (a module's parameters,
    buffers and grads are "weights", an optimizer's state and plain tensors are "inputs"); everything
    fn allocates is tracked from its first op to its release. Tensors kept alive elsewhere (globals,
    closures) are not counted: pass them as arguments. Works on real tensors as on fake ones; with
    fake arguments, their fake mode is entered for the call.
    Returns dict(peak_bytes, flops, breakdown=dict(weights, inputs, allocated), flops_by_op, seconds,
    cpu_seconds), where `allocated` is the peak of what fn allocated on top of the arguments.
    """
    # Storages held only by reference cycles die when the cyclic GC runs; start from a clean slate so
    # that such frees happen at the same points in a real and in a fake run.
    gc.collect()
    weights, inputs = [], []
    _live_tensors((args, kwargs), weights, inputs)
    mode = torch._guards.detect_fake_mode(weights + inputs)
    meter = MemoryFlopMeter()
    for t in weights + inputs:
        meter.track(t)
    base = meter.live
    w = _storage_bytes(weights)
    t0, c0 = time.perf_counter(), time.process_time()
    with (mode if mode is not None and torch._guards.active_fake_mode() is None else contextlib.nullcontext()), meter:
        fn(*args, **kwargs)
    return dict(peak_bytes=meter.peak, flops=sum(meter.flops.values()), flops_by_op=meter.flops,
                breakdown=dict(weights=w, inputs=base - w, allocated=meter.peak - base),
                seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def estimate_training_step(step_fn, *args, **kwargs) -> dict:
    """estimate() of one forward+backward, plus AdamW state, split into weights / optimizer / activations.

    step_fn runs forward and backward (no optimizer step). AdamW keeps two fp32 moments per trainable
    parameter for the whole run, so 8 bytes per trainable parameter are added to the measured peak.
    weights = all parameter (and buffer) bytes; optimizer = AdamW moments + the grads of the trainable
    parameters; activations = peak - weights - optimizer (saved activations, the step's inputs and
    temporaries). The grads are counted as optimizer state although at the activation peak (start of
    backward) most of them do not exist yet, so `activations` is a slight underestimate, never the peak.
    """
    est = estimate(step_fn, *args, **kwargs)
    modules = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.nn.Module)]
    trainable = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values()
    moments = sum(8 * p.numel() for p in trainable)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    peak = est["peak_bytes"] + moments
    weights = est["breakdown"]["weights"]
    est.update(peak_bytes=peak, trainable_params=sum(p.numel() for p in trainable),
               breakdown=dict(weights=weights, optimizer=moments + grads, activations=peak - weights - moments - grads))
    return est


def format_estimate(est: dict, label: str = "") -> str:
    """One line: `estimated peak: 14.2 GiB (weights .. + optimizer .. + activations .. GiB), .. TFLOPs  label`."""
    parts = " + ".join(f"{k} {v / GiB:.2f}" for k, v in est["breakdown"].items())
    return (f"estimated peak: {est['peak_bytes'] / GiB:.1f} GiB ({parts} GiB), "
            f"{est['flops'] / 1e12:.1f} TFLOPs  {label}").rstrip()


# ----------------------------------------------------------------------------------------------
# Weightless real-size Wan models, and the two reference training steps
# ----------------------------------------------------------------------------------------------
def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters in dtype except those of the model's _keep_in_fp32_modules, as from_pretrained(torch_dtype=)
    leaves them (Wan: rope, time_embedder, scale_shift_table, norm1-3 stay fp32)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        for pn, p in list(module._parameters.items()):
            want = torch.float32 if any(k in f"{name}.{pn}".split(".") for k in keep) else dtype
            if p is not None and p.dtype != want:
                module._parameters[pn] = torch.nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
    return model


@contextlib.contextmanager
def _meta_if_fake():
    """Inside fake_mode(): build on the meta device, outside the fake mode (no init, no data); else as is.

    peft's LoRA injection calls module.to(), which swaps parameters in place and cannot swap fake
    ones, so a model is built (and LoRA attached) on meta and made fake afterwards (_meta_to_fake).
    """
    if torch._guards.active_fake_mode() is None:
        yield
        return
    with unset_fake_temporarily(), torch.device("meta"):
        yield


def _meta_to_fake(model: torch.nn.Module) -> torch.nn.Module:
    """Replace meta parameters and buffers by CPU tensors made in the active fake mode (shapes only)."""
    if torch._guards.active_fake_mode() is None:
        return model
    for module in model.modules():
        for n, p in module._parameters.items():
            if p is not None and p.is_meta:
                fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                module._parameters[n] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for n, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[n] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")
    return model


def _config(backbone) -> dict:
    """A WAN_CONFIGS entry by name, or such a dict itself (tests shrink one)."""
    if isinstance(backbone, str) and backbone not in WAN_CONFIGS:
        raise ValueError(f"no known config for backbone '{backbone}' (known: {', '.join(WAN_CONFIGS)})")
    return WAN_CONFIGS[backbone] if isinstance(backbone, str) else backbone


def build_wan_transformer(backbone, dtype=torch.bfloat16, lora_rank: int = 0, gradient_checkpointing: bool = True):
    """WanTransformer3DModel of WAN_CONFIGS[backbone] (a name or such a dict): frozen, in dtype, with
    common.add_lora's adapter (fp32) if lora_rank > 0, block gradient checkpointing if asked.

    Inside `with fake_mode():` this allocates nothing (build the real configs only so: 1.3B is 5.7 GB fp32).
    """
    from diffusers import WanTransformer3DModel
    with _meta_if_fake():
        tr = cast_like_from_pretrained(WanTransformer3DModel(**_config(backbone)["transformer"]), dtype)
        tr.requires_grad_(False)
        if lora_rank:
            add_lora(tr, lora_rank)
        if gradient_checkpointing:
            tr.enable_gradient_checkpointing()
    return _meta_to_fake(tr)


def build_wan_vae(backbone, dtype=torch.bfloat16):
    """AutoencoderKLWan of WAN_CONFIGS[backbone] (a name or such a dict), frozen, in dtype (weightless in
    fake_mode())."""
    from diffusers import AutoencoderKLWan
    with _meta_if_fake():
        vae = cast_like_from_pretrained(AutoencoderKLWan(**_config(backbone)["vae"]), dtype).requires_grad_(False)
    return _meta_to_fake(vae)


def latent_shape(backbone, height=None, width=None, num_frames=None) -> tuple:
    """[16, F', H', W'] of a video (defaults: the backbone's own size); Wan's VAE is 4x in time, 8x in space."""
    cfg = _config(backbone)
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    return (cfg["transformer"]["in_channels"], (f - 1) // 4 + 1, h // 8, w // 8)


def transformer_step(transformer, x0, embeds, sigma: float = 0.5):
    """The generic training step: one flow-matching forward + backward (x_sigma -> v, MSE to eps - x0)."""
    eps = torch.randn_like(x0)
    v = predict_velocity(transformer, add_noise(x0, eps, sigma), sigma, embeds)
    loss = (v - velocity_target(x0, eps)).square().mean()  # = F.mse_loss (whose CPU kernel keeps an [N] buffer)
    loss.backward()
    return loss.detach()


def rgb_refl_step(transformer, vae, x_t, embeds, sigma: float = 0.5, frames: str = "all"):
    """The RGB ReFL baseline: one transformer step with grad, x0 = x_t - sigma v, VAE decode WITH grad,
    a pixel reward, backward through decoder and transformer.

    frames="first" decodes only the first latent frame (Wan's causal VAE maps it to the first video
    frame alone), as PRFL's comparison (ContentV) did. The reward is video.mean(): a stand-in whose
    own memory is not counted (a pixel reward model such as a VLM adds its own, VELR Table 1).
    """
    if frames not in ("all", "first"):
        raise ValueError(f"frames must be 'all' or 'first', got '{frames}'")
    v = predict_velocity(transformer, x_t, sigma, embeds)
    x0 = x0_from_velocity(x_t, v, sigma)
    if frames == "first":
        x0 = x0[:, :, :1]
    video = decode_latents(vae, x0)
    loss = -video.mean()
    loss.backward()
    return loss.detach()


def estimate_transformer_step(backbone="wan2.1-1.3b", height=None, width=None, num_frames=None,
                              lora_rank: int = 64, gradient_checkpointing: bool = True, dtype=torch.bfloat16,
                              batch_size: int = 1) -> dict:
    """estimate_training_step of transformer_step at full size on fake tensors (LoRA, checkpointing, bf16)."""
    cfg = _config(backbone)
    with fake_mode():
        tr = build_wan_transformer(cfg, dtype, lora_rank, gradient_checkpointing)
        x0 = torch.randn(batch_size, *latent_shape(cfg, height, width, num_frames))
        embeds = torch.randn(batch_size, cfg["max_sequence_length"], tr.config.text_dim)
        return estimate_training_step(transformer_step, tr, x0, embeds)


def estimate_rgb_refl_step(backbone="wan2.1-1.3b", height=None, width=None, num_frames=None,
                           frames: str = "all", lora_rank: int = 64, gradient_checkpointing: bool = True,
                           dtype=torch.bfloat16, vae_dtype=torch.bfloat16) -> dict:
    """estimate_training_step of rgb_refl_step (frames "all" or "first") at full size on fake tensors."""
    cfg = _config(backbone)
    with fake_mode():
        tr = build_wan_transformer(cfg, dtype, lora_rank, gradient_checkpointing)
        vae = build_wan_vae(cfg, vae_dtype)
        x_t = torch.randn(1, *latent_shape(cfg, height, width, num_frames))
        embeds = torch.randn(1, cfg["max_sequence_length"], tr.config.text_dim)
        return estimate_training_step(rgb_refl_step, tr, vae, x_t, embeds, frames=frames)


def print_reference_estimates(backbone: str = "wan2.1-1.3b", height=None, width=None, num_frames=None,
                              lora_rank: int = 64) -> dict:
    """Print `estimated peak: X GiB` for the generic LoRA step and the RGB ReFL baseline (all / first frame)."""
    cfg = _config(backbone)
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    out = {}
    for key, run in [("transformer step", lambda: estimate_transformer_step(cfg, h, w, f, lora_rank)),
                     ("RGB ReFL, all frames", lambda: estimate_rgb_refl_step(cfg, h, w, f, "all", lora_rank)),
                     ("RGB ReFL, first frame", lambda: estimate_rgb_refl_step(cfg, h, w, f, "first", lora_rank))]:
        out[key] = est = run()
        print(format_estimate(est, f"| {key}: {backbone} {h}x{w}x{f}, LoRA r{lora_rank}, bf16, block checkpointing "
                                   f"[{est['seconds']:.0f} s, {est['cpu_seconds']:.0f} s CPU]"), flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# --estimate-memory of the method scripts and bench.py: one step of each stage, as the script runs it
# ----------------------------------------------------------------------------------------------
class _ScalarFakeMode(FakeTensorMode):
    """fake_mode() in which a Python number read from a tensor (.item(), int()) is 0 instead of an error: a step's
    random draw (DiNa's mid step) takes its lowest value. No estimated step branches on tensor data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        return super().__torch_dispatch__(func, types, args, kwargs)


def _modules(*objs) -> list:
    """The modules among objs and among the attributes of the stand-in pipelines among them, each once."""
    from types import SimpleNamespace
    found = {}
    for obj in objs:
        for m in vars(obj).values() if isinstance(obj, SimpleNamespace) else (obj,):
            if isinstance(m, torch.nn.Module):
                found[id(m)] = m
    return list(found.values())


class StageEstimates:
    """`with StageEstimates("PRFL", backbone) as est:` estimates one step of each stage of a method script.

    Build modules (stand-in pipeline, the script's own reward models, adapters, copies) inside
    `est.build(lambda: ...)`, then call `est.step(label, step_fn, *args)` per stage. For a real backbone all
    of it is fake (weightless; transformer in bf16 as on CUDA) and `step` prints estimate_training_step's line
    (train=False: estimate(), no AdamW state). For "tiny" the same code runs on real CPU tensors in fp32 (as the
    scripts run on a CPU): the meter's peak of live tensors is then measured (that run is the warm-up), and the
    step is timed over `steps` more runs. No-grad rollout steps before a gradient window do not change the peak
    (each frees its activations), so a step may skip them: rollout_forwards=n adds the FLOPs of n batch-1
    no-grad forwards of the last built generator, printed (and stored as `rollout_flops`) apart.
    """

    steps = 3  # timed runs of each step on tiny, after the metered one

    def __init__(self, method: str, backbone: str):
        self.method, self.backbone, self.cfg = method, backbone, _config(backbone)
        self.real = backbone == "tiny"
        self.mode = contextlib.nullcontext() if self.real else _ScalarFakeMode()
        self.dtype = torch.float32 if self.real else torch.bfloat16
        self.results, self._forward_flops, self.pipe = {}, {}, None
        c = self.cfg
        self.size = f"{backbone} {c['height']}x{c['width']}x{c['num_frames']}"

    def __enter__(self):
        import warnings  # bf16 autocast on CPU: fp32 norm weights take the unfused kernel (so does CUDA's autocast)
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        gc.collect()
        gc.freeze()  # estimate()'s gc.collect() then skips the ~1M objects of torch & co. (0.25 s a call)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        gc.unfreeze()
        return self.mode.__exit__(*exc)

    def build(self, fn):
        """fn() builds modules; each module in its result (a tuple, or a pipeline's attributes) becomes fake."""
        torch.manual_seed(0)
        with _meta_if_fake():
            out = fn()
        for m in _modules(*(out if isinstance(out, tuple) else (out,))):
            _meta_to_fake(m)
        return out

    def pipeline(self, lora_rank: int = 0, gradient_checkpointing: bool = True, vae_dtype=torch.float32):
        """Inside build(): what load_backbone(backbone) puts on the GPU (a frozen transformer, LoRA if lora_rank; the
        VAE, fp32 as loaded) and what backbone_geometry reads. Every later step counts its weights as live."""
        from types import SimpleNamespace
        self.generator = build_wan_transformer(self.cfg, self.dtype, lora_rank, gradient_checkpointing)
        self.pipe = SimpleNamespace(transformer=self.generator, vae=build_wan_vae(self.cfg, vae_dtype),
                                    text_encoder=None, backbone_name=self.backbone,
                                    vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)
        return self.pipe

    def inputs(self, batch: int = 1):
        """Latents [B, 16, F', H', W'], text embeddings [B, L, text_dim] (fp32, as cached) and mask [B, L]."""
        L = self.cfg["max_sequence_length"]
        return (torch.randn(batch, *latent_shape(self.cfg)), torch.randn(batch, L, self.cfg["transformer"]["text_dim"]),
                torch.ones(batch, L, dtype=torch.bool))

    def step(self, label: str, fn, *args, train: bool = True, rollout_forwards: float = 0, quiet: bool = False,
             **kwargs) -> dict:
        """Estimate (and on tiny also time) fn(*args, **kwargs); print one `estimated peak:` line."""
        mods = _modules(self.pipe, *args, *kwargs.values())
        for m in mods:
            m.zero_grad(set_to_none=True)
        # modules (also a pipeline's) as top-level arguments: their weights are live and their trainable
        # parameters get AdamW state; args and kwargs as arguments: their tensors are live from the start
        est = (estimate_training_step if train else estimate)(lambda *_: fn(*args, **kwargs), *mods, args, kwargs)
        if self.real:  # the metered run was the warm-up
            t0 = time.perf_counter()
            for _ in range(self.steps):
                fn(*args, **kwargs)
            est["seconds_per_step"] = (time.perf_counter() - t0) / self.steps
        for m in mods:
            m.zero_grad(set_to_none=True)
        if rollout_forwards:
            key = id(self.generator)
            if key not in self._forward_flops:
                x, e, _ = self.inputs()
                self._forward_flops[key] = estimate(torch.no_grad()(predict_velocity), self.generator, x, 0.5, e)["flops"]
            est["rollout_flops"] = rollout_forwards * self._forward_flops[key]
        return est if quiet else self.report(label, est)

    def report(self, label: str, est: dict) -> dict:
        """Print est's `estimated peak:` line (and, on tiny, the measured time) and keep it under label."""
        extra = (f" (+ {est['rollout_flops'] / 1e12:.0f} TFLOPs of no-grad rollout forwards, not run)"
                 if est.get("rollout_flops") else "")
        print(format_estimate(est, f"| {self.method} {label}: {self.size}{extra} [{est['seconds']:.0f} s]"), flush=True)
        if "seconds_per_step" in est:
            print(f"    measured on the CPU: {est['seconds_per_step'] * 1e3:.1f} ms/step ({self.steps} steps after a "
                  f"warm-up), peak of live tensors {est['peak_bytes'] / 2**20:.2f} MiB", flush=True)
        self.results[label] = est
        return est


def checkpoint_with_adapter(transformer, set_adapter):
    """Block gradient checkpointing that recomputes each block under the peft adapter active in its forward.

    diffusers recomputes under whatever adapter is active when backward runs. When one backward spans
    forwards under different adapters (DiNa's ReFL: a policy-adapter step, then the reward-adapter blocks),
    the recompute then differs from the forward and torch.utils.checkpoint raises a CheckpointError (or, with
    equal ranks, computes wrong gradients). set_adapter(transformer, name) switches adapters.
    """
    def context_fn():
        name = transformer.active_adapters()[0]

        @contextlib.contextmanager
        def recompute():
            before = transformer.active_adapters()[0]
            set_adapter(transformer, name)
            try:
                yield
            finally:
                set_adapter(transformer, before)
        return contextlib.nullcontext(), recompute()

    from torch.utils.checkpoint import checkpoint
    transformer._gradient_checkpointing_func = lambda *a, **k: checkpoint(*a, use_reentrant=False,
                                                                          context_fn=context_fn, **k)
    return transformer


def extrapolate(est: dict, lo: dict, hi: dict, n: float) -> dict:
    """est + (n - 1) (hi - lo) in peak, breakdown, FLOPs and times: the cost of a step that grows linearly in a
    count (VELR's K steps with gradient: each keeps its checkpointed block inputs for the backward), from runs
    at count 1 (lo) and 2 (hi); est is a run at count 1 (lo itself, or a variant with the same count)."""
    lin = lambda key, d=est, a=lo, b=hi: d[key] + (n - 1) * (b[key] - a[key])
    out = dict(est, peak_bytes=lin("peak_bytes"), flops=lin("flops"), seconds=est["seconds"] + hi["seconds"],
               breakdown={k: lin(k, est["breakdown"], lo["breakdown"], hi["breakdown"]) for k in est["breakdown"]})
    if "seconds_per_step" in est:
        out["seconds_per_step"] = lin("seconds_per_step")
    return out


def summarize(root) -> str:
    """One table of the headline numbers in root/*/summary.json (what `make demo` prints)."""
    rows = []
    for path in sorted(Path(root).glob("*/summary.json")):
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
                value = f"{value[0]:.3f} ± {value[1]:.3f}"  # [mean, se]
            if isinstance(value, (int, float, str)):
                rows.append(dict(method=path.parent.name, metric=key, value=value))
    return format_table(rows) if rows else f"no summary.json under {root}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        print(summarize(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "fit-tiny":
        fit_tiny_world(TINY_WEIGHTS, *(int(a) for a in sys.argv[2:4]))
        print(f"wrote {TINY_WEIGHTS}")
    elif len(sys.argv) >= 2 and sys.argv[1] == "estimate":
        for name in sys.argv[2:] or ["wan2.1-1.3b"]:
            print_reference_estimates(name)
    else:
        print("usage: python common.py summarize RUNS_DIR | estimate [wan2.1-1.3b] [wan2.1-14b]\n"
              "(the method scripts are the entry points)")
