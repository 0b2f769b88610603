"""VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models (ensemble LRM + truncated ReFL).
Anonymous ICLR submission under review: no arXiv id, no official code; Sec. 4, Alg. 1 and App. C are the spec.

1. A latent reward model (LRM: 3D residual convs -> position embeddings -> cross-attention to the
   prompt's last text token -> transformer encoder -> pooled scalar) regresses a pixel-space reward
   model's score of the decoded video from the clean latent, with the Huber loss (Sec. 4.1).
2. N independently initialised LRMs form an ensemble: aggregated reward, variance = uncertainty (Sec. 4.2).
3. ReFL with the ensemble: no-grad rollout to a random mid step, K steps with gradient, z0 from the
   velocity, loss -R_l(z0, c) + beta KL(current || initial model); no VAE, no pixel RM in the graph (Sec. 4.3).
4. Online alignment: a replay buffer keeps the highest-variance samples with their pixel reward; every
   few updates the LRMs are re-fitted on buffer samples drawn with probability ~ variance (Sec. 4.3, Alg. 1).
`--reward pixel` is the RGB ReFL baseline on the same schedule (decode with gradient, pixel reward).

Equation -> code:  Eq. (4) -> ResBlock3D;  Eq. (5) -> LatentRewardModel.cross_attn;  Eq. (6) -> huber_loss;
Eq. (7) -> aggregate;  Eq. (8) -> velr_loss (+ kl_velocity);  Sec. 4.3 -> truncated_mid_step, ReplayBuffer,
align_lrm;  Alg. 1 -> pretrain_lrm, finetune;  Table 3 -> table3;  App. C -> Args defaults (AUTO).

The paper leaves some details open; our choices are marked "(ours)" where they are made: the Huber
delta, the form of the KL (squared velocity difference at the last gradient step: the KL of two Gaussian
steps of equal variance, up to scale), mean pooling, one encoder layer, what "downsampling" means
(stride 2 on every latent axis longer than 2), standardising the text token, and the alignment round size.
"""
from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import common
import estimate
import toy
from common import arg

# Fields left at 0 ("auto") take the paper's value (App. C) on real backbones and a CPU-scale value on
# `tiny`: paper rates like 2e-5 would not move a 40k-parameter model in a few-minute demo.
AUTO = {  # field: (paper / real backbones, tiny)
    "num_steps": (50, 10), "mid_step": ([15, 25], [3, 5]), "truncated_steps": (10, 2),
    "lrm_dim": (512, 32), "lrm_lr": (2e-5, 2e-3), "lrm_batch_size": (4, 32), "lrm_epochs": (3, 8),
    "align_lr": (1e-5, 1e-3), "buffer_size": (256, 64), "align_every": (None, 4),
    "tune_steps": (1000, 100), "lr": (1e-5, 2e-3), "lora_rank": (256, 8), "eval_seeds": (2, 8),
}


@dataclass
class Args:
    # generic
    stage: str = arg("all", "rm: pretrain the ensemble LRM; tune: fine-tune with it; all: both",
                     choices=["rm", "tune", "all"])
    reward: str = arg("latent", "latent: VELR (ensemble LRM reward); pixel: RGB ReFL baseline (decode with "
                      "gradient, score with the pixel reward model)", choices=["latent", "pixel"])
    compare: list = arg(None, "extra fine-tuning runs in the same command: 'pixel' (RGB ReFL), 'no-align' "
                        "(VELR without online alignment); 'auto' = both on tiny, none on real backbones",
                        factory=lambda: ["auto"])
    reward_ckpt: str = arg("", "lrm.safetensors of an earlier --stage rm run (default: <out-dir>/lrm.safetensors)")
    out_dir: str = arg("", "run directory (default runs/velr-<backbone>-<time>)")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "cuda / cpu / auto")
    save_videos: int = arg(2, "mp4 samples written before and after each fine-tuning run")
    estimate_memory: bool = arg(False, "only print the estimated peak GPU memory and TFLOPs of one LRM step, one "
                                "fine-tuning step and one --reward pixel step at --backbone's size (no weights, no data)")
    # backbone and data
    backbone: str = arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder")
    data: str = arg("", "prepared 'score' dataset folder (common.load_dataset); default: the toy world")
    toy_samples: int = arg(4096, "toy-world dataset size (half encoded clips, half generator samples; at 1024 the "
                                  "LRMs overfit: test PCC 0.41 vs 0.73)")
    toy_cache: str = arg("runs/toy_data", "where the toy dataset is cached")
    test_fraction: float = arg(0.2, "held-out fraction of the dataset for the LRM test metrics")
    prompts: str = arg("", "fine-tuning prompts, a .txt file with one per line (default: the dataset's prompts)")
    eval_prompts: str = arg("", "evaluation prompts, .txt (default: the 12 held-out toy prompts; real data: "
                            "the first 12 fine-tuning prompts)")
    eval_seeds: int = arg(0, "fresh samples per evaluation prompt (0 = auto: 2; tiny: 8, 96 samples)")
    teacher: str = arg("toy", "pixel-space reward model R: 'toy' (toy.toy_reward), 'pickscore' (CLIP, "
                       "frame-averaged) or 'module:function' taking (video [B,3,F,H,W] in [-1,1], prompts) -> [B]")
    pickscore_model: str = arg("yuvalkirstain/PickScore_v1", "PickScore checkpoint (hub id or folder)")
    pickscore_processor: str = arg("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore's tokenizer")
    # reward model (Sec. 4.1-4.2, App. C.1)
    ensemble_size: int = arg(10, "number of independently initialised LRMs (Sec. 4.2)")
    aggregate: str = arg("mean", "Eq. (7) aggregation of the ensemble", choices=["mean", "min", "max"])
    lrm_dim: int = arg(0, "LRM feature width d_v (0 = auto: 512, ~0.02B params per LRM at Wan scale; tiny: 32)")
    lrm_heads: int = arg(8, "attention heads of the LRM's cross-attention and encoder")
    lrm_layers: int = arg(1, "transformer-encoder layers after the cross-attention (ours: 1)")
    huber_delta: float = arg(1.0, "delta of the Huber loss, Eq. (6) (not given in the paper; ours)")
    lrm_lr: float = arg(0.0, "LRM pretraining learning rate (0 = auto: 2e-5 (paper, Wan); tiny: 2e-3)")
    lrm_batch_size: int = arg(0, "LRM batch size, pretraining and alignment (0 = auto: 4 (paper); tiny: 32)")
    lrm_epochs: int = arg(0, "LRM pretraining epochs (0 = auto: 3 (paper); tiny: 8)")
    # fine-tuning (Sec. 4.3, Alg. 1, App. C.2)
    tune_steps: int = arg(0, "generator updates (0 = auto: 1000, not given in the paper; tiny: 100)")
    batch_size: int = arg(4, "prompts per update (App. C.2)")
    lr: float = arg(0.0, "LoRA learning rate (0 = auto: 1e-5 (paper, Wan); tiny: 2e-3)")
    lora_rank: int = arg(0, "LoRA rank, alpha = rank (0 = auto: 256 as in App. C.3; tiny: 8)")
    beta: float = arg(-1.0, "weight of the KL term in Eq. (8) (-1 = auto: 10 (App. C.2); tiny: 1, as at 10 the "
                           "toy-scale reward does not move the policy)")
    num_steps: int = arg(0, "sampling steps (0 = auto: 50 (paper); tiny: 10)")
    mid_step: list = arg(None, "range [a, b] of the step where gradients start (0 0 = auto: 15 25 of 50 "
                         "(paper, Sec. 5.6); tiny: 3 5 of 10)", factory=lambda: [0, 0])
    truncated_steps: int = arg(0, "K, denoising steps with gradient (0 = auto: 10 (paper); tiny: 2)")
    grad_clip: float = arg(1.0, "gradient-norm clip of the LoRA update (ours)")
    gradient_checkpointing: bool = arg(True, "block gradient checkpointing in the DiT (App. C.3)")
    # online alignment (Sec. 4.3, App. C.2)
    buffer_size: int = arg(0, "replay-buffer size (0 = auto: 256 (paper); tiny: 64)")
    align_every: int = arg(0, "re-align the LRMs every this many updates (0 = auto: 10 epochs of the "
                           "fine-tuning prompts (paper); tiny: 4)")
    align_rounds: int = arg(2, "alignment rounds each time; a round = buffer_size samples (ours) (App. C.2)")
    align_lr: float = arg(0.0, "LRM learning rate during alignment (0 = auto: 1e-5 (paper); tiny: 1e-3)")


def resolve_auto(args: Args, num_prompts: int) -> Args:
    """Fill every field left at 0 from AUTO (paper value, or the tiny value on `--backbone tiny`)."""
    tiny = args.backbone == "tiny"
    for name, (paper, small) in AUTO.items():
        if getattr(args, name) in (0, [0, 0]):
            setattr(args, name, small if tiny else paper)
    if args.beta < 0:  # 0 is a valid choice (no KL), so "auto" is -1 here
        args.beta = 1.0 if tiny else 10.0
    if args.align_every is None:  # paper: every 10 epochs over the fine-tuning prompts
        args.align_every = max(1, 10 * num_prompts // args.batch_size)
    if "auto" in args.compare:
        args.compare = ["no-align", "pixel"] if tiny else []
    if len(args.mid_step) != 2:
        raise ValueError(f"--mid-step takes two numbers (a range), got {args.mid_step}")
    a, b = args.mid_step
    if not (0 <= a <= b and b + args.truncated_steps <= args.num_steps):
        raise ValueError(f"--mid-step {a} {b} with K={args.truncated_steps} does not fit {args.num_steps} steps")
    return args


# ----------------------------------------------------------------------------------------------
# Latent reward model (Sec. 4.1) and the ensemble (Sec. 4.2)
# ----------------------------------------------------------------------------------------------
class ResBlock3D(nn.Module):
    """Eq. (4): H = SiLU(GN(W2 * SiLU(GN(W1 * H))) + D(H)); W1 and the 1x1x1 shortcut D downsample."""

    def __init__(self, cin: int, cout: int, stride: tuple):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1)
        self.norm1 = nn.GroupNorm(math.gcd(8, cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1)
        self.norm2 = nn.GroupNorm(math.gcd(8, cout), cout)
        self.down = nn.Conv3d(cin, cout, 1, stride)

    def forward(self, h):
        y = F.silu(self.norm1(self.conv1(h)))
        return F.silu(self.norm2(self.conv2(y)) + self.down(h))


class LatentRewardModel(nn.Module):
    """R_l(Z^v, Z^c) -> scalar: three ResBlock3D, learnable temporal + spatial position embeddings,
    cross-attention to the projected last text token (Eq. 5), a transformer encoder, mean pooling."""

    def __init__(self, latent_shape, text_dim: int, dim: int = 512, heads: int = 8, layers: int = 1):
        super().__init__()
        grid, widths, blocks = list(latent_shape[1:]), [latent_shape[0], dim // 4, dim // 2, dim], []
        for cin, cout in zip(widths[:-1], widths[1:]):
            stride = tuple(2 if g > 2 else 1 for g in grid)  # D (ours): halve every axis longer than 2
            grid = [(g - 1) // s + 1 for g, s in zip(grid, stride)]
            blocks.append(ResBlock3D(cin, cout, stride))
        self.blocks = nn.Sequential(*blocks)              # Wan 480p [16,21,60,104] -> [512,3,8,13]
        self.pos_t = nn.Parameter(torch.randn(grid[0], dim) * 0.02)             # temporal P_v
        self.pos_s = nn.Parameter(torch.randn(grid[1] * grid[2], dim) * 0.02)   # spatial P_v
        # (ours) the text token is standardised with statistics of the training prompts: T5 ends in an
        # RMS norm, so the last tokens of different prompts share a large common part.
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))
        self.text_proj = nn.Linear(text_dim, dim)                                # W_p
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))

    def forward(self, z, text):
        """z [B, C, T, H, W] clean latent, text [B, text_dim] last non-padding token -> reward [B]."""
        tokens = self.blocks(z.float()).flatten(2).transpose(1, 2)            # Z^vf [B, T'H'W', D], time-major
        tokens = tokens + (self.pos_t[:, None] + self.pos_s[None]).flatten(0, 1)
        p = self.text_proj((text.float() - self.text_mean) / self.text_std)[:, None]  # P_f [B, 1, D]
        # Eq. (5): video tokens query the text token. With a single key the attention weights are 1, so
        # this adds a prompt-dependent vector to every token; the encoder makes text and video interact.
        tokens = tokens + self.cross_attn(self.norm_q(tokens), p, p, need_weights=False)[0]
        return self.head(self.encoder(tokens).mean(1)).squeeze(-1)


class EnsembleLRM(nn.Module):
    """N independently initialised LRMs (Sec. 4.2); forward returns every member's reward, [N, B]."""

    def __init__(self, n: int, latent_shape, text_dim: int, dim: int, heads: int, layers: int, seed: int = 0):
        super().__init__()
        self.config = dict(n=n, latent_shape=list(latent_shape), text_dim=text_dim, dim=dim, heads=heads,
                           layers=layers)
        members = []
        for i in range(n):  # distinct seeds: independence is what makes the variance an uncertainty
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + i)
                members.append(LatentRewardModel(latent_shape, text_dim, dim, heads, layers))
        self.members = nn.ModuleList(members)

    def set_text_statistics(self, text_tokens):
        t = text_tokens.float()
        std = torch.nan_to_num(t.std(0), nan=1.0)  # one prompt: no spread, keep the scale
        for m in self.members:
            m.text_mean.copy_(t.mean(0))
            m.text_std.copy_(std.clamp(min=0.1 * std.mean().item()))  # floor: near-constant dims do not explode

    def forward(self, z, text):
        return torch.stack([m(z, text) for m in self.members])


def aggregate(preds, how: str = "mean"):
    """Eq. (7): R_l = Agg(R_1, ..., R_N) over the member axis of [N, B]."""
    return {"mean": lambda p: p.mean(0), "min": lambda p: p.min(0).values, "max": lambda p: p.max(0).values}[how](preds)


def last_text_token(embeds, mask):
    """Z^c_{d_t,:}: each prompt's last non-padding token (T5's end-of-sequence), [P, D] (Sec. 4.1)."""
    return embeds[torch.arange(len(embeds)), mask.long().sum(1).clamp(min=1) - 1]


def save_lrm(lrm: EnsembleLRM, path):
    common.save_safetensors(lrm.state_dict(), path, metadata=dict(config=json.dumps(lrm.config)))


def load_lrm(path, latent_shape=None) -> EnsembleLRM:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no LRM checkpoint there (make one with --stage rm, or pass --reward-ckpt)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: not a VELR LRM checkpoint (no 'config' in the safetensors metadata)")
    cfg = json.loads(meta["config"])
    if latent_shape is not None and list(latent_shape) != cfg["latent_shape"]:
        raise ValueError(f"{path}: LRM made for latents {cfg['latent_shape']}, the backbone makes {list(latent_shape)}")
    lrm = EnsembleLRM(**cfg)
    lrm.load_state_dict(load_file(str(path)))
    return lrm.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Pixel-space reward models (the teacher R)
# ----------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pickscore_reward(model, tokenize, video, prompts):
    """PickScore (a CLIP image reward) averaged over frames; differentiable in the video [B,3,F,H,W]."""
    B, _, Fr, H, W = video.shape
    size = model.config.vision_config.image_size
    frames = (video.transpose(1, 2).flatten(0, 1) + 1) / 2                 # [B*F, 3, H, W] in [0, 1]
    h, w = max(size, round(H * size / min(H, W))), max(size, round(W * size / min(H, W)))
    frames = F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False)  # short side -> size
    top, left = (h - size) // 2, (w - size) // 2                                       # centre crop
    frames = frames[:, :, top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=video.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    features = lambda out: getattr(out, "pooler_output", out)  # transformers 5 returns an output object
    img = F.normalize(features(model.get_image_features(pixel_values=(frames - mean) / std)), dim=-1)
    with torch.no_grad():
        txt = F.normalize(features(model.get_text_features(**tokenize(prompts))), dim=-1)
    return (model.logit_scale.exp() * (img.view(B, Fr, -1) * txt[:, None]).sum(-1)).mean(1)


def load_teacher(args, device):
    """The pixel reward model R(video, prompts) -> [B] that the LRMs regress (Sec. 4.1)."""
    if args.teacher == "toy":
        return toy.toy_reward
    if args.teacher == "pickscore":
        from transformers import AutoProcessor, CLIPModel
        model = CLIPModel.from_pretrained(args.pickscore_model).eval().requires_grad_(False).to(device)
        tok = AutoProcessor.from_pretrained(args.pickscore_processor).tokenizer
        tokenize = lambda p: {k: v.to(device) for k, v in tok(p, padding=True, truncation=True, max_length=77,
                                                               return_tensors="pt").items()}
        return lambda video, prompts: pickscore_reward(model, tokenize, video, prompts)
    if ":" in args.teacher:
        module, name = args.teacher.split(":", 1)
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"--teacher {args.teacher}: module '{module}' has no function '{name}'")
        return fn
    raise ValueError(f"--teacher {args.teacher}: use toy, pickscore or module:function")


@torch.no_grad()
def pixel_reward(pipe, teacher, latents, prompts, batch_size: int = 8):
    """R(Dec(z), c) without gradient: labels for the LRM, and the ground truth in the toy world."""
    out = []
    for i in range(0, len(latents), batch_size):
        video = common.decode_latents(pipe, latents[i:i + batch_size].to(pipe.vae.device))
        out.append(teacher(video, prompts[i:i + batch_size]).float().cpu())
    r = torch.cat(out)
    if not torch.isfinite(r).all():
        raise FloatingPointError(f"teacher '{getattr(teacher, '__name__', teacher)}' returned NaN/inf rewards")
    return r


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def huber_loss(pred, target, delta: float = 1.0):
    """Eq. (6): 1/2 d^2 if |d| <= delta else delta (|d| - delta/2), d = R(Dec(z), c) - R_l(z, c)."""
    d = (target - pred).abs()
    return torch.where(d <= delta, 0.5 * d ** 2, delta * (d - 0.5 * delta)).mean()


def kl_velocity(v, v_ref):
    """KL[pi_theta || pi_theta_old] at the last gradient step (Alg. 1): two Gaussian steps of equal
    variance have a KL proportional to the squared difference of their means, i.e. of the velocities."""
    return ((v - v_ref) ** 2).mean()


def velr_loss(reward, kl, beta: float):
    """Eq. (8): L = -E[R_l(z0, c) - beta KL]."""
    return -(reward.mean() - beta * kl)


# ----------------------------------------------------------------------------------------------
# Truncated mid-step rollout (Sec. 4.3) and the replay buffer of online alignment
# ----------------------------------------------------------------------------------------------
def truncated_mid_step(transformer, noise, embeds, sigmas, start: int, K: int):
    """No-grad rollout to step `start`, K denoising steps with gradient, then z0 from the last velocity.

    Returns (z0, v, v_ref), v_ref from the initial model (LoRA adapters disabled: no second copy of the
    weights) at the input of the K-th step, for the KL term.
    """
    with torch.no_grad():
        x, _ = common.rollout(transformer, noise, embeds, sigmas, 0, start)
    last = start + K - 1
    x, _ = common.rollout(transformer, x, embeds, sigmas, start, last, grad_steps=range(start, last))
    # the K-th step is written out because its input also goes to the reference model
    v = common.predict_velocity(transformer, x, sigmas[last], embeds)
    with torch.no_grad():
        transformer.disable_adapters()
        v_ref = common.predict_velocity(transformer, x, sigmas[last], embeds)
        transformer.enable_adapters()
    return common.x0_from_velocity(x, v, sigmas[last]), v, v_ref


class ReplayBuffer:
    """B = {(z, prompt, R, sigma^2)}, the `size` highest-variance samples seen so far (App. C.2)."""

    def __init__(self, size: int):
        self.size, self.z, self.prompt_idx, self.reward, self.var = size, None, None, None, None

    def __len__(self):
        return 0 if self.var is None else len(self.var)

    def add(self, z, prompt_idx, reward, var):
        new = [z.detach().cpu(), prompt_idx.cpu(), reward.detach().cpu().float(), var.detach().cpu().float()]
        if self.var is not None:
            new = [torch.cat([a, b]) for a, b in zip([self.z, self.prompt_idx, self.reward, self.var], new)]
        keep = new[3].argsort(descending=True)[:self.size]  # new samples replace the lowest-variance ones
        self.z, self.prompt_idx, self.reward, self.var = (t[keep] for t in new)

    def sample(self, n: int, generator=None):
        """Indices drawn with probability proportional to sigma^2 (Sec. 4.3)."""
        return torch.multinomial(self.var.clamp(min=1e-12), n, replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------------
# Stage 1: pretrain the ensemble (Sec. 4.1, App. C.1); Table 3 in miniature
# ----------------------------------------------------------------------------------------------
def fit_members(lrm, opts, z, text, target, steps: int, batch_size: int, delta: float, draw, desc: str):
    """Huber regression (Eq. 6) of every member on its own batches, draw(n) -> indices (independent training)."""
    lrm.train().requires_grad_(True)
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        total = 0.0
        for member, opt in zip(lrm.members, opts):
            idx = draw(batch_size).to(z.device)
            loss = huber_loss(member(z[idx], text[idx]), target[idx], delta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() / len(opts)
        losses.append(total)
    lrm.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def predict(lrm, z, text, batch_size: int = 256):
    return torch.cat([lrm(z[i:i + batch_size], text[i:i + batch_size]) for i in range(0, len(z), batch_size)], 1)


def regression_metrics(pred, target) -> dict:
    return dict(mse=((pred - target) ** 2).mean().item(), pcc=torch.corrcoef(torch.stack([pred, target]))[0, 1].item())


def table3(p_train, y_train, p_test, y_test, sizes=(1, 3, 5, 10)) -> list[dict]:
    """Ensemble of k = mean of k members; metrics averaged over the disjoint groups of k members
    (k = 1: every member alone, i.e. the expected single LRM rather than a lucky or unlucky one)."""
    rows, n = [], len(p_train)
    for k in sorted(k for k in {*sizes, n} if k <= n):
        groups = [list(range(i, i + k)) for i in range(0, n - k + 1, k)]
        m = {f"{split} {key}": sum(regression_metrics(p[g].mean(0), y)[key] for g in groups) / len(groups)
             for split, p, y in (("train", p_train, y_train), ("test", p_test, y_test)) for key in ("mse", "pcc")}
        rows.append({"LRM": f"en-{k}", "train MSE": m["train mse"], "train PCC": m["train pcc"],
                     "test MSE": m["test mse"], "test PCC": m["test pcc"], "groups": len(groups)})
    return rows


def pretrain_lrm(args, data, text_tokens, latent_shape, device, run):
    """Offline Huber pretraining of every member (Alg. 1, first loop); returns the ensemble and Table 3."""
    train, test = common.split_indices(len(data["latents"]), args.test_fraction, args.seed)
    z, y = data["latents"].float().to(device), data["score"].float().to(device)
    text = text_tokens[data["prompt_idx"]].to(device)
    lrm = EnsembleLRM(args.ensemble_size, latent_shape, text_tokens.shape[1], args.lrm_dim, args.lrm_heads,
                      args.lrm_layers, seed=args.seed).to(device)
    lrm.set_text_statistics(text_tokens.to(device))
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lrm_lr, weight_decay=1e-4) for m in lrm.members]
    steps = args.lrm_epochs * max(1, len(train) // args.lrm_batch_size)
    g = torch.Generator().manual_seed(args.seed)
    losses = fit_members(lrm, opts, z[train], text[train], y[train], steps, args.lrm_batch_size, args.huber_delta,
                         lambda n: torch.randint(0, len(train), (n,), generator=g), "pretrain LRMs")
    for s in range(0, steps, max(1, steps // 50)):
        run.log(s, "rm", huber=losses[s])
    return lrm, table3(predict(lrm, z[train], text[train]), y[train], predict(lrm, z[test], text[test]), y[test])


def align_lrm(lrm, opts, buffer: ReplayBuffer, text_tokens, args, generator) -> float:
    """Online alignment (Alg. 1, else-branch): Huber re-fit on buffer samples drawn by variance."""
    dev = next(lrm.parameters()).device
    steps = args.align_rounds * max(1, args.buffer_size // args.lrm_batch_size)
    return fit_members(lrm, opts, buffer.z.to(dev), text_tokens[buffer.prompt_idx].to(dev), buffer.reward.to(dev),
                       steps, args.lrm_batch_size, args.huber_delta, lambda n: buffer.sample(n, generator),
                       "align LRMs")[-1]


# ----------------------------------------------------------------------------------------------
# Stage 2: fine-tune the generator (Sec. 4.3, Alg. 1), or the RGB ReFL baseline (--reward pixel)
# ----------------------------------------------------------------------------------------------
def reset_peak_memory(device):
    """CPU: reset the process's peak RSS (Linux clear_refs), so that each run in one process reports its
    own peak (common.StepTimer reads it); on CUDA StepTimer resets the allocator's peak itself."""
    if torch.device(device).type != "cuda":
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the peak then covers the whole process so far


def finetune(args, pipe, lrm, teacher, prompts, embeds, text_tokens, mode: str, align: bool, run, name: str):
    """Alg. 1 on a fresh LoRA adapter `name`; mode 'latent' = VELR, 'pixel' = RGB ReFL (VAE + R in the graph)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    params = common.add_lora(tr, args.lora_rank, args.lora_rank, adapter_name=name)
    tr.set_adapter(name)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sigmas = common.sigma_schedule(args.num_steps, common.backbone_config(args.backbone)["flow_shift"])
    align_opts = [torch.optim.AdamW(m.parameters(), lr=args.align_lr, weight_decay=1e-4)
                  for m in lrm.members] if align else []
    buffer, g = ReplayBuffer(args.buffer_size), torch.Generator().manual_seed(args.seed + 1)
    g_align = torch.Generator().manual_seed(args.seed + 2)  # own stream: every run sees the same draws from g
    shape = common.backbone_geometry(pipe)["latent_shape"]
    reset_peak_memory(dev)
    timer, t0, log = common.StepTimer(dev), time.perf_counter(), []
    for step in tqdm(range(args.tune_steps), desc=f"fine-tune {name}"):
        idx = torch.randint(0, len(prompts), (args.batch_size,), generator=g)  # same draws in every run
        noise = torch.randn((args.batch_size, *shape), generator=g).to(dev)
        start = int(torch.randint(args.mid_step[0], args.mid_step[1] + 1, (1,), generator=g))
        names = [prompts[i] for i in idx]
        with timer:  # the generator update only: what latent vs pixel reward changes
            z0, v, v_ref = truncated_mid_step(tr, noise, embeds[idx].to(dev), sigmas, start, args.truncated_steps)
            if mode == "latent":
                preds = lrm(z0, text_tokens[idx].to(dev))        # [N, B]; LRM frozen, gradient reaches z0 only
                reward = aggregate(preds, args.aggregate)
            else:
                reward = teacher(common.decode_latents(pipe, z0), names)
            kl = kl_velocity(v, v_ref)
            loss = velr_loss(reward, kl, args.beta)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tune {name} step {step}: loss {loss.item()} (reward {reward.tolist()}, "
                                         f"kl {kl.item()}); lower --lr or check the reward model")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
        row = dict(loss=loss.item(), reward=reward.mean().item(), kl=kl.item(), start=start)
        if mode == "latent":  # the batch's pixel reward (no gradient): buffer labels and the gap curve
            r_pix = pixel_reward(pipe, teacher, z0.detach(), names)
            row.update(pixel_reward=r_pix.mean().item(), gap=(reward.detach().cpu() - r_pix).abs().mean().item(),
                       variance=preds.var(0).mean().item())
            if align:
                buffer.add(z0, idx, r_pix, preds.detach().var(0))
                if (step + 1) % args.align_every == 0:
                    row["align_huber"] = align_lrm(lrm, align_opts, buffer, text_tokens, args, g_align)
        run.log(step, f"tune-{name}", **row)
        log.append(row)
    common.save_lora(tr, run.dir / f"lora-{name}", name)
    return dict(seconds_per_step=timer.seconds_per_step, peak_memory_gib=timer.peak_memory_gib(),
                wall_seconds=time.perf_counter() - t0, log=log)


@torch.no_grad()
def evaluate(pipe, teacher, prompts, embeds, seeds: int, num_steps: int):
    """Pixel reward of fresh samples from fixed seeds (paired before/after); the truth in the toy world."""
    e = embeds.repeat_interleave(seeds, 0)
    names = [p for p in prompts for _ in range(seeds)]
    z = common.sample_latents(pipe, e, [10**6 + i for i in range(len(e))], num_steps=num_steps)
    return pixel_reward(pipe, teacher, z, names), z


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def read_prompts(path) -> list[str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: prompt file not found (one prompt per line)")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def load_data(args, pipe, teacher):
    """The 'score' dataset (toy world by default); re-labelled when another teacher made its scores."""
    if args.data:
        data, meta = common.load_dataset(args.data, "score")
        where = args.data
    else:
        data, meta = toy.toy_dataset(pipe, "score", args.toy_samples, args.seed, cache_dir=args.toy_cache)
        where = f"toy dataset in {args.toy_cache}"
    common.check_latent_shape(data["latents"], pipe, where)
    shape = tuple(common.backbone_geometry(pipe)["latent_shape"])
    if tuple(data["latents"].shape[1:]) != shape:
        raise ValueError(f"{where}: latents {tuple(data['latents'].shape[1:])}, the backbone samples {shape}")
    made_by = meta.get("teacher", "toy" if meta.get("source") == "toy" else None)
    if made_by != args.teacher:
        print(f"re-labelling {len(data['latents'])} latents with the teacher '{args.teacher}' (scores from {made_by})")
        data["score"] = pixel_reward(pipe, teacher, data["latents"], [meta["prompts"][i] for i in data["prompt_idx"]])
    return data, meta


def estimate_memory(args) -> dict:
    """--estimate-memory, batch 1, fake tensors at the backbone's size (estimate.StageEstimates): one member's LRM
    step (all members' weights, grads and AdamW state live), the fine-tuning step from the mid step (the K steps
    cost linearly in K: run at K = 1, 2 and extrapolated) and its RGB ReFL twin (fp32 VAE as loaded, toy teacher)."""
    args = resolve_auto(args, 1)
    K, shift = args.truncated_steps, common.backbone_config(args.backbone)["flow_shift"]
    with estimate.StageEstimates("VELR", args.backbone) as est:
        x0, embeds, mask = est.inputs()
        text, sigmas = last_text_token(embeds, mask), common.sigma_schedule(args.num_steps, shift)
        new_lrm = lambda: EnsembleLRM(args.ensemble_size, x0.shape[1:], text.shape[1], args.lrm_dim, args.lrm_heads,
                                      args.lrm_layers)

        def tune_step(pipe, lrm, x, embeds, text, K: int, pixel=False):  # finetune's step, from start = 0
            z0, v, v_ref = truncated_mid_step(pipe.transformer, x, embeds, sigmas, 0, K)
            reward = (toy.toy_reward(common.decode_latents(pipe, z0), toy.toy_prompts()[:1]) if pixel
                      else aggregate(lrm(z0, text), args.aggregate))
            velr_loss(reward, kl_velocity(v, v_ref), args.beta).backward()

        def lrm_step(lrm, z, text):  # fit_members: one member's step; the others hold their grads meanwhile
            for p in lrm.members[1:].parameters():
                p.grad = torch.zeros_like(p)
            huber_loss(lrm.members[0](z, text), torch.zeros(len(z)), args.huber_delta).backward()

        _, lrm = est.build(lambda: (est.pipeline(), new_lrm()))  # pretrain_lrm: the generator is on the GPU
        est.step("LRM step (1 member)", lrm_step, lrm, x0, text)
        pipe, lrm = est.build(lambda: (est.pipeline(args.lora_rank, args.gradient_checkpointing),
                                       new_lrm().requires_grad_(False)))
        run = lambda k, pixel: est.step("", tune_step, pipe, lrm, x0, embeds, text, k, pixel, quiet=True,
                                        rollout_forwards=sum(args.mid_step) / 2)  # E[start]: no-grad steps
        lo, hi = run(1, False), run(2, False)
        est.report(f"fine-tune step (K={K} with grad, LRMs on z0, KL)", estimate.extrapolate(lo, lo, hi, K))
        est.report(f"RGB ReFL step (--reward pixel, K={K}, all frames)", estimate.extrapolate(run(1, True), lo, hi, K))
    return est.results


def main(args: Args) -> dict:
    if args.estimate_memory:
        return estimate_memory(args)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    run = common.Run("velr", args, args.out_dir or None)
    pipe = common.load_backbone(args.backbone, device)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    teacher = load_teacher(args, device)
    data, meta = load_data(args, pipe, teacher)
    # prompt tables: the LRM sees each prompt's last text token; the generator the full embeddings
    prompts, embeds, mask = meta["prompts"], data["prompt_embeds"], data["prompt_mask"]
    if args.prompts:
        prompts = read_prompts(args.prompts)
        embeds, mask = common.encode_prompts(pipe, prompts)
    eval_prompts = (read_prompts(args.eval_prompts) if args.eval_prompts else
                    toy.toy_prompts("eval") if not args.data else prompts[:12])
    eval_embeds, eval_mask = common.encode_prompts(pipe, eval_prompts)
    common.drop_text_encoder(pipe)
    args = resolve_auto(args, len(prompts))
    common.save_json(vars(args), run.dir / "args.json")  # with the auto values filled in
    data_tokens = last_text_token(data["prompt_embeds"], data["prompt_mask"])  # the LRM's training prompts
    text_tokens = last_text_token(embeds, mask)                                  # the fine-tuning prompts
    shape = common.backbone_geometry(pipe)["latent_shape"]
    summary, lrm = dict(run_dir=str(run.dir)), None

    if args.stage == "rm" or args.reward == "latent" or "no-align" in args.compare:
        ckpt = Path(args.reward_ckpt or run.dir / "lrm.safetensors")
        if args.stage in ("rm", "all") and not args.reward_ckpt:
            lrm, summary["lrm"] = pretrain_lrm(args, data, data_tokens, shape, device, run)
            save_lrm(lrm, ckpt)
            for r in (summary["lrm"][0], summary["lrm"][-1]):  # single LRM vs the whole ensemble
                summary.update({f"lrm_{r['LRM']}_test_mse": r["test MSE"], f"lrm_{r['LRM']}_test_pcc": r["test PCC"]})
            print("\nLRM vs pixel reward model (Table 3 in miniature; en-k = mean of k members, averaged over "
                  "disjoint groups)\n" + common.format_table(summary["lrm"]))
        else:
            lrm = load_lrm(ckpt, shape).to(device)
        print(f"LRM: {sum(p.numel() for p in lrm.members[0].parameters()) / 1e6:.3f}M params per member, "
              f"{len(lrm.members)} members")
    if args.stage == "rm":
        run.summary(summary)
        return summary

    base, z = evaluate(pipe, teacher, eval_prompts, eval_embeds, args.eval_seeds, args.num_steps)
    save_samples(pipe, z, args.save_videos, run.dir / "videos", "base")
    summary.update(base_reward=dict(zip(("mean", "se"), common.mean_se(base))), runs={})
    eval_tokens = last_text_token(eval_embeds, eval_mask).repeat_interleave(args.eval_seeds, 0)
    lrm_score = lambda z: aggregate(predict(lrm, z.to(device), eval_tokens.to(device)), args.aggregate).cpu()
    lrm_base = lrm_score(z) if lrm is not None else None  # the pretrained ensemble's view of the samples
    rows = [{"run": "base model", "true reward": "{:.3f} ± {:.3f}".format(*common.mean_se(base))}]
    runs = [("velr", "latent", True)] if args.reward == "latent" else [("pixel", "pixel", False)]
    if args.reward == "latent":  # the side-by-side runs: same prompts, noise, schedule and seeds
        runs += [("velr_noalign", "latent", False)] * ("no-align" in args.compare)
        runs += [("pixel", "pixel", False)] * ("pixel" in args.compare)
    lrm_state = {k: v.clone() for k, v in lrm.state_dict().items()} if lrm is not None else None
    for name, mode, align in runs:
        if lrm is not None:
            lrm.load_state_dict(lrm_state)  # every run starts from the same pretrained ensemble
        stats = finetune(args, pipe, lrm, teacher, prompts, embeds, text_tokens, mode, align, run, name)
        after, z = evaluate(pipe, teacher, eval_prompts, eval_embeds, args.eval_seeds, args.num_steps)
        save_samples(pipe, z, args.save_videos, run.dir / "videos", name)
        pipe.transformer.delete_adapters(name)  # the next run starts from the base model again
        lrm_delta = None
        if lrm is not None:
            lrm.load_state_dict(lrm_state)
            lrm_delta = common.mean_se(lrm_score(z) - lrm_base)
        summary["runs"][name], row = report_run(name, stats, base, after, lrm_delta)
        rows.append(row)
    summary["table"] = rows
    for name, r in summary["runs"].items():  # flat headline numbers (what `common.py summarize` lists)
        summary.update({f"{name}_true_reward_delta": r["delta"]["mean"], f"{name}_true_reward_delta_se":
                        r["delta"]["se"], f"{name}_seconds_per_step": r["seconds_per_step"],
                        f"{name}_peak_memory_gib": r["peak_memory_gib"]})
    print(f"\nFine-tuning, {args.tune_steps} updates. True reward: pixel reward R of {len(base)} fresh samples of "
          f"the evaluation prompts (mean ± SE; Δ paired by seed). Δ R_l: the same samples scored by the pretrained "
          f"ensemble. |R_l - R|: on the training batches, first → last quarter of the updates. s/step and peak "
          f"memory: the update alone, measured in this process\n" + common.format_table(rows, list(rows[-1])))
    run.summary(summary)
    return summary


RUN_NAMES = {"velr": "VELR", "velr_noalign": "VELR w/o online alignment", "pixel": "RGB ReFL (--reward pixel)"}


def save_samples(pipe, z, n: int, folder, tag: str):
    for i in range(min(n, len(z))):
        video = common.decode_latents(pipe, z[i:i + 1].to(pipe.vae.device))[0]
        common.export_video(video, Path(folder) / f"{tag}-{i}.mp4")


def report_run(name, stats, base, after, lrm_delta) -> tuple[dict, dict]:
    """summary.json entry and table row of one fine-tuning run."""
    log, q = stats["log"], max(1, len(stats["log"]) // 4)
    gap = (sum(r["gap"] for r in log[:q]) / q, sum(r["gap"] for r in log[-q:]) / q) if "gap" in log[0] else None
    (m, s), (dm, ds) = common.mean_se(after), common.mean_se(after - base)
    res = dict(reward=dict(mean=m, se=s), delta=dict(mean=dm, se=ds), lrm_reward_delta=lrm_delta, gap_first_last=gap,
               **{k: stats[k] for k in ("seconds_per_step", "peak_memory_gib", "wall_seconds")})
    return res, {"run": RUN_NAMES[name], "true reward": f"{m:.3f} ± {s:.3f}", "Δ true": f"{dm:+.3f} ± {ds:.3f}",
                 "Δ R_l": "n/a" if lrm_delta is None else "{:+.3f} ± {:.3f}".format(*lrm_delta),
                 "|R_l - R| first→last": "n/a" if gap is None else "{:.3f} → {:.3f}".format(*gap),
                 "s/step": stats["seconds_per_step"], "peak GiB": stats["peak_memory_gib"]}


if __name__ == "__main__":
    main(common.parse_args(Args))
