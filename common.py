"""common.py: the model layer every method script shares.

    backbones      load_backbone -> diffusers WanPipeline ("tiny", a hub name, a folder); WAN_CONFIGS; geometry
    text, flow     encode_prompts, drop_text_encoder; shift_sigma, sigma_schedule, add_noise, velocity_target,
                   x0_from_velocity, euler_step, sample_train_sigma, predict_velocity
    rollout        rollout(transformer, x, embeds, sigmas, start, stop, grad_steps, cfg), sample_latents
    DiT prefix     dit_prefix_features(transformer, x, timestep, embeds, taps) (stops after max(taps))
    LoRA, VAE      add_lora / save_lora (diffusers format); encode_video / decode_latents; save_safetensors (atomic)
    multi-GPU      dist_init, local_batch / gather, shard (FSDP2 per block), full_tensors: torchrun = data parallel
    arguments      arg (a dataclass field with its help; rundir.parse_args / cli turn Args into the CLI), UserError
dataset.py holds the dataset format, rundir.py the run folder (checkpoints, resume, plots, reporting), toy.py the
toy world and the tiny backbone, estimate.py the memory estimator.
Conventions (Wan2.1 / diffusers): x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1]; the transformer's timestep
is 1000 sigma and it predicts the velocity eps - x0. Latents are the VAE's normalised latents [B, 16, F', H', W'].
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm


class UserError(Exception):
    """A mistake in the user's flags, files or data: rundir.cli prints `error: <message>` (no traceback) and exits
    with `code`, 2 for a bad argument (as argparse does), 1 for bad data or files."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ==== Backbones: the real Wan2.1 T2V checkpoints' configs (shapes, parameter counts and memory without weights)
_WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,  # 5.7B params
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
_WAN_DIT = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_CONFIGS = {
    "wan2.1-1.3b": dict(repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832, num_frames=81,
                        max_sequence_length=512, flow_shift=3.0, vae=_WAN_VAE, text_encoder=_UMT5_XXL,
                        transformer=dict(_WAN_DIT, num_attention_heads=12, ffn_dim=8960, num_layers=30)),
    "wan2.1-14b": dict(repo="Wan-AI/Wan2.1-T2V-14B-Diffusers", height=720, width=1280, num_frames=81,
                       max_sequence_length=512, flow_shift=5.0, vae=_WAN_VAE, text_encoder=_UMT5_XXL,
                       transformer=dict(_WAN_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    # 12 blocks, so every method's paper default (8 or 12 blocks, taps 4/8/12) exists; inner dim 32 = 2 heads x 16,
    # which the 8 heads of PRFL and DiNa divide. is_residual (Wan2.2's pooling shortcuts, same class) lets the tiny
    # VAE learn toy clips in minutes on a CPU; latents_mean/std are replaced by the fitted ones (toy.py).
    "tiny": dict(repo=None, height=32, width=32, num_frames=9, max_sequence_length=32, flow_shift=3.0,
                 vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, is_residual=True,
                          temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[0.5] * 16),
                 transformer=dict(_WAN_DIT, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
                                  ffn_dim=64, num_layers=12, rope_max_seq_len=32),
                 text_encoder=dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                   relative_attention_num_buckets=8)),
}


def backbone_config(name: str) -> dict:
    """A backbone's config without its weights: the WAN_CONFIGS entry of a known name or hub id, or a diffusers
    folder's own configs read from disk (see folder_config)."""
    for key, cfg in WAN_CONFIGS.items():
        if name in (key, cfg["repo"]):
            return cfg
    folder = Path(name).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--backbone {name}: neither a known backbone ({', '.join(WAN_CONFIGS)}) nor a diffusers Wan "
                        f"folder (no model_index.json in {folder})", 2)
    read = lambda f: json.loads((folder / f).read_text()) if (folder / f).is_file() else {}
    return folder_config(read("transformer/config.json"), read("vae/config.json"), read("text_encoder/config.json"),
                         read("scheduler/scheduler_config.json"), str(folder))


def folder_config(transformer: dict, vae: dict, text_encoder: dict, scheduler: dict, repo: str) -> dict:
    """A checkpoint's config from its own transformer / VAE / scheduler configs. Flow shift: the scheduler's. Default
    video size and text length: those of the known checkpoint with the same DiT shape (a local 14B copy gets 14B's),
    else Wan2.1-1.3B's."""
    tr = {k: v for k, v in transformer.items() if not k.startswith("_")}
    shape = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")
    known = next((c for c in WAN_CONFIGS.values() if all(tr.get(k) == c["transformer"][k] for k in shape)),
                 WAN_CONFIGS["wan2.1-1.3b"])
    own = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    shift = scheduler.get("flow_shift") or scheduler.get("shift")  # UniPC / FlowMatchEuler name it differently
    return dict(known, repo=repo, flow_shift=shift or known["flow_shift"], transformer=tr,
                vae=own(vae), text_encoder=own(text_encoder) or known["text_encoder"])


def load_backbone(name: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  height: int | None = None, width: int | None = None, num_frames: int | None = None):
    """Load a WanPipeline: "tiny" (toy.build_tiny_pipeline), "wan2.1-1.3b", "wan2.1-14b", a folder or a hub id.
    DiT and text encoder in `dtype` (default bf16 on CUDA, fp32 on CPU: pick_dtype), the VAE in fp32. UMT5-XXL in bf16
    is 11 GiB (21 in fp32), so on a 24 GB card it fits beside the DiT for encoding, then drop_text_encoder frees it.
    The video size (default: the checkpoint's, backbone_config) is fixed here: backbone_geometry(pipe) returns it."""
    from diffusers import WanPipeline

    device, dtype = torch.device(device), dtype or pick_dtype(None, device)
    hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()
    known = any(name in (k, c["repo"]) for k, c in WAN_CONFIGS.items())
    cfg = backbone_config(name) if known or not hub_id else None  # a folder's config before any weight (or an error)
    if name == "tiny":
        import toy
        pipe = toy.build_tiny_pipeline()
    else:
        repo = WAN_CONFIGS[name]["repo"] if name in WAN_CONFIGS else name
        try:  # transformer in `dtype`, everything else (VAE, text encoder) in fp32
            pipe = WanPipeline.from_pretrained(repo, dtype={"transformer": dtype, "text_encoder": dtype,
                                                            "default": torch.float32})
        except (OSError, ValueError) as e:  # hub unreachable / not cached / not a Wan folder
            folder = f"checkpoints/{repo.split('/')[-1]}"
            raise UserError(f"could not load the Wan checkpoint '{repo}' ({type(e).__name__}: {e}).\nDownload it "
                            f"once where the Hugging Face hub is reachable:\n    hf download {repo} --local-dir "
                            f"{folder}\nthen pass the folder: --backbone {folder}") from None
    cfg = cfg or folder_config(dict(pipe.transformer.config), dict(pipe.vae.config), pipe.text_encoder.config.to_dict(),
                               dict(pipe.scheduler.config), name)
    pipe.backbone_name = name
    pipe.wan_config = dict(cfg, height=height or cfg["height"], width=width or cfg["width"],
                           num_frames=num_frames or cfg["num_frames"])
    backbone_geometry(pipe)  # checks the size
    for m in (pipe.transformer, pipe.text_encoder):  # tiny (from_pretrained keeps Wan's fp32 modules; .to() would not)
        if m.dtype != dtype:
            m.to(dtype=dtype)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.to(device).requires_grad_(False)
    return pipe


def pick_dtype(name: str | None, device) -> torch.dtype:
    """--dtype bf16 | fp32 of the DiT (and text encoder); None: bf16 on CUDA, fp32 on CPU."""
    name = name or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def backbone_geometry(pipe, height=None, width=None, num_frames=None) -> dict:
    """geometry() of a loaded pipeline: the video size load_backbone fixed, unless given here."""
    return geometry(getattr(pipe, "wan_config", None) or backbone_config(pipe.backbone_name), height, width, num_frames)


def geometry(cfg: dict, height=None, width=None, num_frames=None) -> dict:
    """A video size (default: the config's) checked against the backbone (VAE: 4x in time, 8x in space; 2x2 patches)
    with its latent shape, token count, flow shift and text length; no weights needed (checks before loading)."""
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    st, ss = 2 ** sum(cfg["vae"]["temperal_downsample"]), 2 ** (len(cfg["vae"]["dim_mult"]) - 1)
    p = cfg["transformer"]["patch_size"]
    if min(h, w, f) <= 0 or (f - 1) % st or h % (ss * p[1]) or w % (ss * p[2]):
        raise UserError(f"video {h}x{w}x{f} (--height --width --num-frames): frames must be {st}k+1 and height/width "
                        f"positive multiples of {ss * p[1]}", 2)
    shape = (cfg["transformer"]["in_channels"], (f - 1) // st + 1, h // ss, w // ss)
    return dict(height=h, width=w, num_frames=f, latent_shape=shape, flow_shift=cfg["flow_shift"],
                tokens=shape[1] // p[0] * shape[2] // p[1] * shape[3] // p[2],
                max_sequence_length=cfg["max_sequence_length"])


# ==== Text: encode every prompt once; training never needs the text encoder afterwards.
@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int | None = None, batch_size: int = 16):
    """T5 embeddings [P, L, D] (zero-padded past each prompt, as Wan does) and the mask [P, L]."""
    L = max_sequence_length or backbone_geometry(pipe)["max_sequence_length"]
    if pipe.text_encoder is None:
        raise RuntimeError("the text encoder was already dropped: encode prompts before training")
    embeds, masks = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        e = pipe._get_t5_prompt_embeds(chunk, max_sequence_length=L, device=pipe.text_encoder.device, dtype=torch.float32)
        ids = pipe.tokenizer(chunk, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        embeds, masks = embeds + [e.cpu()], masks + [ids.attention_mask.bool()]
    return torch.cat(embeds), torch.cat(masks)


def drop_text_encoder(pipe):
    """Free the text encoder (UMT5-XXL: 11 GiB in bf16) once every prompt is encoded."""
    pipe.text_encoder = None
    torch.cuda.empty_cache()  # a no-op without CUDA


# ==== Flow matching (rectified flow, as Wan is trained), one line each, differentiable.
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


def _bcast(sigma, x):  # a float or a [B] sigma against x [B, ...]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


def predict_velocity(transformer, x, sigma, embeds):
    """The generator's velocity v(x, sigma, text) in fp32; sigma is a float or a [B] tensor."""
    dtype, t = transformer.dtype, (torch.as_tensor(sigma, device=x.device, dtype=torch.float32) * 1000).expand(len(x))
    return transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                       return_dict=False)[0].float()


# ==== Rollout with a gradient window
def rollout(transformer, x, embeds, sigmas, start: int = 0, stop: int | None = None, grad_steps=(),
            guidance_scale: float = 1.0, negative_embeds=None, progress: bool = False):
    """Denoise x from sigmas[start] to sigmas[stop] with Euler steps; return (x, v of the last step).
    Autograd is on only for the step indices in `grad_steps` (the window), so gradient reaches the generator only
    through those steps (the Euler update stays differentiable in x). guidance_scale > 1: classifier-free guidance
    with `negative_embeds` (one batched call). Block checkpointing applies in the window when enabled."""
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
                   guidance_scale: float = 1.0, negative_embeds=None, batch_size: int | None = None,
                   desc: str | None = None):
    """Fresh samples (no gradient) from fixed seeds: one latent per (embedding row, seed); desc: a progress bar. Default
    batch: ~4k tokens (Wan 480p: 1; tiny: 341, 2.5x faster than 16 on a CPU; rows are independent: the same samples)."""
    geo, dev, out = backbone_geometry(pipe), pipe.transformer.device, []
    batch_size = batch_size or max(1, 4096 // geo["tokens"])
    sigmas = sigma_schedule(num_steps, shift or geo["flow_shift"])
    for i in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=desc is None, leave=False):
        e = embeds[i:i + batch_size].to(dev)
        noise = torch.stack([torch.randn(geo["latent_shape"], generator=torch.Generator().manual_seed(s))
                             for s in seeds[i:i + batch_size]]).to(dev)
        neg = None if negative_embeds is None else negative_embeds.expand(len(e), -1, -1).to(dev)
        out.append(rollout(pipe.transformer, noise, e, sigmas, guidance_scale=guidance_scale,
                           negative_embeds=neg)[0].cpu())
    return torch.cat(out)


# ==== DiT prefix features: the transformer's own embeddings, then only its first blocks
def dit_prefix_features(transformer, x, timestep, embeds, taps=(8,)):
    """Run patch/rope/condition embeddings and blocks[:max(taps)] (the rest never runs); `timestep` in 0..1000.
    Returns dict(hidden=[h after block k for k in taps], each [B, N, D], text=[B, L, D] embedded text tokens,
    temb=[B, D], grid=(F', H'/2, W'/2) token grid in raster order). Block checkpointing as in the model's forward."""
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


# ==== LoRA (peft through diffusers), saved in the diffusers format
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections of attn1 and attn2


def add_lora(transformer, rank: int, alpha: float | None = None, adapter_name: str = "default",
             blocks: list[int] | None = None, targets=LORA_TARGETS):
    """Attach a (named) LoRA adapter; base weights stay frozen; `blocks` restricts it to those blocks.
    LoRA params are kept in fp32 even when the base runs in bf16 (diffusers' cast_training_params)."""
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
    state = full_tensors(lora_state_dict(transformer, adapter_name))  # every rank gathers, rank 0 writes
    if is_main():  # the adapter's config (alpha!) goes into the file's metadata, or it would reload with alpha = r
        WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=state,
                                      transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


GiB = 2**30


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Atomic write: a temp file in the same folder, then rename (never a half-written file). Under torchrun every
    rank calls it (sharded tensors are gathered) and rank 0 alone writes."""
    tensors = full_tensors(tensors)
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def save_json(obj, path):  # atomic, on rank 0, as save_safetensors
    if is_main():
        (tmp := Path(path).with_name(Path(path).name + ".tmp")).write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)


def _latent_stats(vae, device="cpu"):  # the VAE's per-channel latent mean and std, [1, 16, 1, 1, 1]
    return [torch.tensor(vae.config[k], device=device).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std")]


@torch.no_grad()
def encode_video(pipe, video: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] -> normalised latents (posterior mean), as the pipeline does."""
    vae, (mean, std) = pipe.vae, _latent_stats(pipe.vae)
    return torch.cat([(vae.encode(video[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                       - mean) / std for i in range(0, len(video), batch_size)])


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> videos [B, 3, F, H, W] in [-1, 1], differentiable; `pipe`: a WanPipeline or its VAE."""
    vae = getattr(pipe, "vae", pipe)
    mean, std = _latent_stats(vae, latents.device)
    for m in vae.decoder.modules() if latents.device.type == "cpu" else []:  # oneDNN's Conv3d: ~1.5x faster with
        if isinstance(m, torch.nn.Conv3d):  # channels-last weights (same values to 1e-6; saved files are contiguous)
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


# ==== Multi-GPU: `torchrun --nproc_per_node N <script>.py` = data parallel, transformer blocks sharded by FSDP2. Every
# rank draws the same global batch from the same seeded generators and keeps its share (local_batch); FSDP2 averages
# the gradients, so N ranks train what one process trains. Rank 0 writes the files (save_safetensors / save_json).
def dist_init(device: str = "auto") -> torch.device:
    """This rank's device; under torchrun (WORLD_SIZE > 1) first the process group: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        if dist.get_rank() != 0:  # one rank reports: tqdm honours TQDM_DISABLE, prints go nowhere
            os.environ["TQDM_DISABLE"], sys.stdout = "1", open(os.devnull, "w")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(device.replace("auto", "cpu"))


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def local_batch(x):
    """This rank's contiguous share of a global batch (dim 0) that every rank holds whole."""
    rank, world = rank_world()
    if world == 1:
        return x
    require(len(x) % world == 0, f"a batch of {len(x)} does not split over {world} processes: choose batch sizes "
                                 f"and --eval-samples divisible by the number of GPUs", 2)
    return x.chunk(world)[rank]


def gather(x: torch.Tensor) -> torch.Tensor:
    """The inverse of local_batch: every rank's slice, concatenated in rank order (e.g. evaluation results)."""
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(rank_world()[1])]
    if len(parts) > 1:
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts) if len(parts) > 1 else x


def shard(transformer, *heads):
    """FSDP2 under torchrun (else nothing): fully_shard each transformer block (its LoRA included) and each small
    trainable head whole. The transformer's root stays unsharded: dit_prefix_features calls its embeddings and
    blocks one by one, and its own parameters never train."""
    if rank_world()[1] == 1:
        return
    from torch.distributed.fsdp import fully_shard
    for module in [*transformer.blocks, *heads]:  # each its own FSDP root: say "reshard", or a root keeps its
        fully_shard(module, reshard_after_forward=True)  # gathered weights after a forward (FSDP2's root default)


def full_tensors(tensors: dict) -> dict:
    """Sharded (DTensor) values gathered whole on every rank (a collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


# ==== Arguments and user errors
def arg(default, help: str, **kw):
    """A dataclass field with its --help text (every Args field uses this); kw: choices, type (for a None default),
    min / max / gt (parse_args refuses a value outside them, and any non-finite float), nonempty (a list flag)."""
    factory = kw.pop("factory", None)
    value = dict(default_factory=factory) if factory is not None else dict(default=default)
    return dataclasses.field(**value, metadata=dict(help=help, **kw))


def require(ok, why: str, code: int = 1):
    """A user error unless ok: `error: <why>`, exit code 1 (data, files) or 2 (flags)."""
    if not ok:
        raise UserError(why, code)
