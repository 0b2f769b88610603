"""DiNa-LRM: "Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling" (arXiv 2602.11146).

A reward model that lives inside the generator. The first 12 DiT blocks of the generator (with
a LoRA adapter) read a noisy latent x_sigma = (1 - sigma) x0 + sigma eps; the hidden states after
blocks 4, 8, 12 are FiLM-modulated by the timestep embedding and read by a gated query head into a
scalar r(x_sigma, sigma, c). It is trained on preference pairs with a Thurstone likelihood whose
comparison noise grows with the diffusion noise (Eq. 1-2) and the fidelity loss (Eq. 3). At
inference it scores at sigma = 0.4, or concatenates the tokens of three noise levels for one head
pass (noise ensembling). Then it replaces the pixel reward in ReFL: roll out without grad to a
random late step, take one step with grad, score x0-hat re-noised at sigma = 0.4.

Equation -> code (the arXiv HTML was not recoverable verbatim: equations are numbered here in the
order the method section derives them; sections as in the paper's method / experiments)
    Eq. (1)  sigma_u^2(sigma) = k sigma^2 + sigma_u^2          -> thurstone_variance
    Eq. (2)  P(A > B) = Phi((r_A - r_B) / sqrt(2 sigma_u^2))   -> thurstone_probability
    Eq. (3)  L_fid = 1 - sqrt(P)  (FRank fidelity)             -> thurstone_fidelity_loss
             ablations: fixed variance (0.5), Bradley-Terry   -> --loss thurstone-constant | bt
    Sec. 3   FiLM taps + gated query head                     -> FiLMTap, QueryAttention, DiNaHead
    Sec. 3   r(x_sigma, sigma, c), noise ensembling           -> dina_reward (several sigmas = ensemble)
    Sec. 5   ReFL with the learned reward, loss 2 - (r+12)/10 -> refl_loss, refl_step

Follows the official code (HKUST-C4G/diffusion-rm, flow-grpo-rm) where it is more specific than the
paper: variance 2 sigma^2 + 0.05 (not 0.1^2), 1e-6 guards inside the sqrt's, fidelity loss (the NLL
is disabled there), one sigma and one eps shared by both items of a pair, the ensemble sharing one
eps across its levels, no EMA (the released trainer never applies it), the reward normalisation
(r + 12) / 10 of the RL reward function, and weight sharing: the reward model is a second, named
peft adapter ("reward") on the generator's own blocks, the policy LoRA another one ("policy").
Wan port (the paper is on SD3.5-M images): one text tap (Wan's text stream is fixed after the
condition embedder), FiLM on Wan's time embedding, a key-padding mask for the text tokens.
Ties (pref = 2): the official data has none; by default they are dropped from training (--ties
drop), or kept with the FRank target 1/2 (--ties half). Held-out accuracy counts strict pairs only.
"""
from __future__ import annotations

import dataclasses
import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from tqdm.auto import tqdm

import common
import estimate
import toy
from common import arg

TINY = "tiny"
# Two adapters on one transformer is the point here (shared base weights), not a mistake.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


@dataclass
class Args:
    # generic
    stage: str = arg("all", "rm: train the reward model; tune: ReFL with it (needs --reward-ckpt); all: both",
                     choices=["rm", "tune", "all"])
    out_dir: str = arg("", "run directory (default runs/dina_lrm-<backbone>-<time>)")
    seed: int = arg(0, "seed of everything (data split, sigmas, noise, rollouts)")
    device: str = arg("auto", "cuda | cpu | auto")
    data: str = arg("", "a prepared 'pairs' dataset folder (common.load_dataset); empty = the toy world")
    toy_pairs: int = arg(2048, "pairs in the toy dataset (only without --data); ~30% are strict, the rest ties")
    toy_cache: str = arg("runs/toy_data", "cache folder of the toy dataset")
    reward_ckpt: str = arg("", "reward_model.safetensors of an earlier run: skip stage 1 and use it")
    estimate_memory: bool = arg(False, "only print the estimated peak GPU memory and TFLOPs of one reward-model step "
                                "and one ReFL step at --backbone's size (fake tensors: no weights, no data)")
    # backbone
    backbone: str = arg(TINY, "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder")
    # reward model (Sec. 3; official config sd3m/thurstone-12layer.yaml)
    rm_blocks: int = arg(12, "first DiT blocks the reward model keeps (and puts its LoRA on)")
    taps: list = arg(None, "1-based blocks whose hidden states the head reads", factory=lambda: [4, 8, 12])
    rm_lora_rank: int = arg(64, "reward LoRA rank")
    rm_lora_alpha: float = arg(128.0, "reward LoRA alpha")
    num_queries: int = arg(4, "learnable queries of the head")
    num_heads: int = arg(8, "attention heads of the head")
    loss: str = arg("thurstone", "thurstone (Eq. 1-3) | thurstone-constant (fixed variance, ablation) | bt",
                    choices=["thurstone", "thurstone-constant", "bt"])
    k: float = arg(2.0, "Eq. (1): slope k of the noise-dependent comparison variance")
    clean_var: float = arg(0.05, "Eq. (1): comparison variance sigma_u^2 at sigma = 0 (official code; paper text 0.1^2)")
    constant_var: float = arg(0.5, "variance of the thurstone-constant ablation (official code)")
    ties: str = arg("drop", "pairs labelled tie: drop (official data has none) | half (FRank target 1/2)",
                    choices=["drop", "half"])
    rm_lr: float = arg(0.0, "AdamW lr; 0 = auto: 5e-5 (paper) on Wan, 1e-3 on tiny (random init, 1-minute demo)")
    rm_weight_decay: float = arg(0.01, "AdamW weight decay (official)")
    rm_batch: int = arg(32, "pairs per step (official: 4 per GPU x 8 GPUs)")
    rm_steps: int = arg(0, "optimiser steps; 0 = auto: one epoch (paper) on Wan, 300 on tiny")
    grad_clip: float = arg(1.0, "gradient-norm clip of both stages (official)")
    test_fraction: float = arg(0.2, "held-out share of the pairs for the accuracy table")
    score_sigma: float = arg(0.4, "sigma of a single-draw score (official default for generated latents)")
    eval_sigmas: list = arg(None, "sigmas of the single-draw accuracy sweep", factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8])
    ensemble_sigmas: list = arg(None, "noise-ensemble levels (tokens concatenated)", factory=lambda: [0.2, 0.5, 0.7])
    ablation: str = arg("auto", "also train the fixed-variance ablation for the table; auto = on for tiny only",
                        choices=["auto", "on", "off"])
    # fine-tuning: ReFL with the learned reward (flow-grpo-rm config/refl.py)
    refl_steps: int = arg(0, "ReFL optimiser steps; 0 = auto: 150 (paper) on Wan, 40 on tiny (80 and 160 game the reward model)")
    refl_batch: int = arg(0, "prompts per ReFL step; 0 = auto: 64 (official 2 x 4 accum x 8 GPUs) on Wan, 8 on tiny")
    refl_lr: float = arg(0.0, "policy AdamW lr; 0 = auto: 1e-4 (official) on Wan, 5e-5 on tiny (1e-3 games the reward model)")
    policy_rank: int = arg(32, "policy LoRA rank (official)")
    policy_alpha: float = arg(64.0, "policy LoRA alpha (official)")
    num_steps: int = arg(0, "sampling steps of rollout and evaluation; 0 = auto: 40 (official) on Wan, 20 on tiny")
    late_fraction: float = arg(0.75, "the grad step is drawn from [late_fraction * num_steps, num_steps - 1] (40 -> 30..39)")
    guidance_scale: float = arg(0.0, "CFG of the no-grad rollout; 0 = auto: 4.5 (official) on Wan, 1 (off) on tiny")
    reward_offset: float = arg(12.0, "ReFL reward R = (r + offset) / scale, loss = mean(2 - R) (official)")
    reward_scale: float = arg(10.0, "see --reward-offset")
    eval_seeds: int = arg(0, "fresh samples per held-out prompt for the before/after evaluation; 0 = auto: 4 on Wan, "
                                 "8 on tiny (12 toy prompts: 96 paired samples)")
    save_videos: int = arg(2, "mp4 samples to write before and after ReFL")


def resolve(args: Args) -> Args:
    """Fill the 0 / 'auto' fields: paper values on real backbones, small ones on tiny (see the help)."""
    tiny = args.backbone == TINY
    pick = lambda v, paper, small: v if v else (small if tiny else paper)
    args.rm_lr = pick(args.rm_lr, 5e-5, 1e-3)
    args.refl_steps = pick(args.refl_steps, 150, 40)
    args.refl_batch = pick(args.refl_batch, 64, 8)
    args.refl_lr = pick(args.refl_lr, 1e-4, 5e-5)
    args.eval_seeds = pick(args.eval_seeds, 4, 8)
    args.num_steps = pick(args.num_steps, 40, 20)
    args.guidance_scale = pick(args.guidance_scale, 4.5, 1.0)
    args.rm_steps = args.rm_steps or (300 if tiny else -1)  # -1: one epoch, known once the data is loaded
    if args.ablation == "auto":
        args.ablation = "on" if tiny else "off"
    return args


# ----------------------------------------------------------------------------------------------
# The noise-calibrated Thurstone likelihood (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
def thurstone_variance(sigma, k: float = 2.0, clean_var: float = 0.05):
    """Eq. (1): per-item comparison variance k sigma^2 + sigma_u^2: a noisier latent is judged less surely."""
    return k * sigma ** 2 + clean_var


def thurstone_probability(r_a, r_b, var):
    """Eq. (2): P(A > B) = Phi((r_A - r_B) / sqrt(2 var)) (both items carry the variance; 1e-6 as the code)."""
    z = (r_a - r_b) / torch.sqrt(2 * var + 1e-6)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def thurstone_fidelity_loss(p, target=1.0):
    """Eq. (3): FRank fidelity 1 - sqrt(y p) - sqrt((1-y)(1-p)); y = 1 (A preferred) gives 1 - sqrt(p).

    Bounded (unlike -log p), so confidently wrong labels cannot dominate; y = 1/2 is our tie target.
    """
    target = torch.as_tensor(target, dtype=p.dtype, device=p.device)
    return 1 - torch.sqrt(target * p + 1e-6) - torch.sqrt((1 - target) * (1 - p) + 1e-6) * (target < 1)


def preference_loss(r_a, r_b, sigma, target, args: Args):
    """The training loss per pair for --loss (A = the preferred item when target = 1)."""
    if args.loss == "bt":  # Bradley-Terry ablation, -log sigmoid(r_A - r_B) (ties: soft target)
        return F.binary_cross_entropy_with_logits(r_a - r_b, torch.as_tensor(target, dtype=r_a.dtype).expand_as(r_a),
                                                  reduction="none")
    var = (thurstone_variance(sigma, args.k, args.clean_var) if args.loss == "thurstone"
           else torch.full_like(sigma, args.constant_var))
    return thurstone_fidelity_loss(thurstone_probability(r_a, r_b, var), target)


# ----------------------------------------------------------------------------------------------
# Reward head: FiLM-modulated multi-tap features, read by 4 queries (Sec. 3.1, official RewardHead)
# ----------------------------------------------------------------------------------------------
class FiLMTap(nn.Module):
    """x (1 + gamma(temb)) + beta(temb) + layer embedding, then reduced to width/4.

    The last FiLM layer starts at zero, so at initialisation the tap is the identity plus the layer
    embedding: training starts from the backbone's own features at every noise level.
    """

    def __init__(self, dim: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(cond_dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)
        self.layer_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.reduce = nn.Linear(dim, out_dim)

    def modulate(self, x, temb):
        gamma, beta = self.cond(temb)[:, None].chunk(2, -1)
        return x * (1 + gamma) + beta + self.layer_embed

    def forward(self, x, temb):
        return self.reduce(self.modulate(x, temb))


class ValueGate(nn.Module):
    """A per-token scalar gate sigmoid(MLP(x)) on the values; zero-initialised, so it starts at 1/2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return torch.sigmoid(self.net(x))


def attend(q, k, v, heads: int, mask=None):
    """Multi-head scaled dot-product attention of [B, Nq, D] over [B, N, D]; mask [B, N] (True = keep)."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return rearrange(out, "b h n d -> b n (h d)")


class QueryAttention(nn.Module):
    """Queries attend to video tokens and (gated=True) to text tokens: two softmaxes, summed.

    Separate keys/values per modality, so video and text do not compete inside one softmax; the
    value gates let the head ignore uninformative tokens (Qiu et al. 2025, as the official head).
    """

    def __init__(self, dim: int, heads: int, gated: bool):
        super().__init__()
        self.heads, self.gated = heads, gated
        self.norm_q, self.norm_v = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.to_q, self.k_v, self.v_v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        if gated:
            self.norm_t = nn.RMSNorm(dim)
            self.k_t, self.v_t = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.gate_v, self.gate_t = ValueGate(dim), ValueGate(dim)

    def forward(self, queries, video, text=None, text_mask=None):
        q, v = self.to_q(self.norm_q(queries)), self.norm_v(video)
        if not self.gated:
            return queries + self.out(attend(q, self.k_v(v), self.v_v(v), self.heads))
        t = self.norm_t(text)
        h = attend(q, self.k_v(v), self.gate_v(v) * self.v_v(v), self.heads)
        h = h + attend(q, self.k_t(t), self.gate_t(t) * self.v_t(t), self.heads, text_mask)
        return queries + self.out(h)


class DiNaHead(nn.Module):
    """Tap features of one or more noise levels -> scalar reward (official RewardHead, Wan port)."""

    def __init__(self, dim: int, num_taps: int = 3, num_queries: int = 4, heads: int = 8, adapter: str = "reward"):
        super().__init__()
        self.adapter = adapter  # the peft adapter (on the generator's blocks) that this head reads
        w = dim // 4
        self.film_video = nn.ModuleList(FiLMTap(dim, dim, w) for _ in range(num_taps))
        self.film_text = FiLMTap(dim, dim, w)  # Wan: one text tap (no text stream through the blocks)
        self.fuse_video, self.fuse_text = nn.Linear(num_taps * w, dim), nn.Linear(w, dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.attn1 = QueryAttention(dim, heads, gated=True)   # video + text, value-gated
        self.attn2 = QueryAttention(dim, heads, gated=False)  # video only
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.to_reward = nn.Linear(dim, 1)

    def tokens(self, feats):
        """One noise level's prefix features -> (video tokens [B, N, D], text tokens [B, L, D])."""
        temb = feats["temb"].float()
        video = self.fuse_video(torch.cat([f(h.float(), temb) for f, h in zip(self.film_video, feats["hidden"])], -1))
        return video, self.fuse_text(self.film_text(feats["text"].float(), temb))

    def forward(self, feats_per_level: list[dict], text_mask):
        """Noise ensembling: the tokens of all levels are concatenated along the token axis, one head pass."""
        video, text = zip(*(self.tokens(f) for f in feats_per_level))
        video, text = torch.cat(video, 1), torch.cat(text, 1)
        mask = text_mask.repeat(1, len(feats_per_level))
        q = self.queries.expand(len(video), -1, -1)
        q = self.attn1(q, video, text, mask)
        q = self.attn2(q, video)
        q = q + self.ffn(self.ffn_norm(q))
        return self.to_reward(q).squeeze(-1).mean(1)  # per-query scalar, averaged over queries


# ----------------------------------------------------------------------------------------------
# Adapters: the reward model and the policy share the generator's base weights
# ----------------------------------------------------------------------------------------------
def set_active_adapter(transformer, name: str):
    """transformer.set_adapter(name), keeping every parameter's requires_grad as it was.

    peft's set_adapter also marks the active adapter trainable and the others frozen: it would give
    the reward adapter gradients in ReFL (and freeze the policy between its forward and backward).
    """
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.set_adapter(name)
    for p, f in flags:
        p.requires_grad_(f)


def dina_reward(transformer, head, x0, embeds, text_mask, sigmas, eps, taps):
    """r(x_sigma, sigma, c) with the reward adapter; several sigmas = noise ensembling (one eps for all).

    sigmas: a list of floats or [B] tensors. Gradient flows to x0 (ReFL) and to whatever is trainable.
    """
    set_active_adapter(transformer, head.adapter)
    feats = []
    for s in sigmas:
        x_t = common.add_noise(x0, eps, s)  # x_sigma = (1 - sigma) x0 + sigma eps
        s = torch.as_tensor(s, dtype=torch.float32, device=x0.device)
        feats.append(common.dit_prefix_features(transformer, x_t, 1000 * s, embeds, taps=tuple(taps)))
    return head(feats, text_mask)


def add_reward_model(pipe, args: Args, name: str = "reward"):
    """Reward LoRA on the kept blocks + a new head; returns (head, lora params)."""
    if max(args.taps) > args.rm_blocks:
        raise ValueError(f"--taps {args.taps}: the reward model keeps only {args.rm_blocks} blocks")
    params = common.add_lora(pipe.transformer, args.rm_lora_rank, args.rm_lora_alpha, adapter_name=name,
                             blocks=list(range(args.rm_blocks)))
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    head = DiNaHead(dim, len(args.taps), args.num_queries, args.num_heads, name).to(pipe.transformer.device)
    return head, params


def save_reward_model(path, transformer, head, args: Args, name: str = "reward"):
    """One safetensors file: head.* and the reward adapter's lora.* (+ the shape args as metadata)."""
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors.update({f"lora.{k}": v for k, v in common.lora_state_dict(transformer, name).items()})
    meta = {k: getattr(args, k) for k in ("rm_blocks", "taps", "rm_lora_rank", "rm_lora_alpha",
                                          "num_queries", "num_heads", "backbone")}
    common.save_safetensors(tensors, path, metadata=meta)


def load_reward_model(path, pipe, args: Args):
    """Rebuild the reward adapter and head from save_reward_model's file (frozen, for ReFL)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reward-ckpt {path}: no such file (write one with --stage rm)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    for k in ("rm_blocks", "taps", "rm_lora_rank", "rm_lora_alpha", "num_queries", "num_heads"):
        if k in meta and meta[k] != str(getattr(args, k)):
            raise ValueError(f"{path}: trained with {k}={meta[k]}, this run has {getattr(args, k)}")
    sd = load_file(str(path))
    head, params = add_reward_model(pipe, args)
    try:
        head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    except RuntimeError as e:
        raise ValueError(f"{path}: head weights do not fit this backbone ({str(e).splitlines()[1].strip()})") from None
    lora = {k[5:]: v for k, v in sd.items() if k.startswith("lora.")}
    result = set_peft_model_state_dict(pipe.transformer, lora, adapter_name="reward")
    if not lora or getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: reward LoRA keys missing or unexpected (lora.* tensors: {len(lora)})")
    return head, params


# ----------------------------------------------------------------------------------------------
# Stage 1: train the reward model on preference pairs
# ----------------------------------------------------------------------------------------------
def load_pairs(pipe, args: Args):
    """The 'pairs' dataset (a folder, or the toy world) as tensors, validated against the backbone."""
    if args.data:
        data, meta = common.load_dataset(args.data, "pairs")
    else:
        data, meta = toy.toy_dataset(pipe, "pairs", args.toy_pairs, seed=args.seed, cache_dir=args.toy_cache)
    where = args.data or f"toy pairs-{args.toy_pairs}"
    for k in ("latents_a", "latents_b"):
        common.check_latent_shape(data[k], pipe, f"{where} '{k}'")
    if not ((data["pref"] >= 0) & (data["pref"] <= 2)).all():
        raise ValueError(f"{where}: 'pref' must be 0 (A), 1 (B) or 2 (tie)")
    if not (data["pref"] < 2).any():
        raise ValueError(f"{where}: every pair is a tie; the preference model needs strict pairs")
    return data, meta


def chosen_first(data, idx, device):
    """Batch of pairs ordered (preferred, other) with the target y: 1 for strict pairs, 1/2 for ties."""
    pref = data["pref"][idx]
    a, b = data["latents_a"][idx], data["latents_b"][idx]
    swap = (pref == 1).view(-1, 1, 1, 1, 1)
    win, lose = torch.where(swap, b, a), torch.where(swap, a, b)
    p = data["prompt_idx"][idx]
    target = torch.where(pref == 2, 0.5, 1.0)
    return (win.to(device), lose.to(device), data["prompt_embeds"][p].to(device),
            data["prompt_mask"][p].to(device), target.to(device))


def update(opt, loss, params, grad_clip: float, where: str, lr_flag: str):
    """One optimiser step, both stages: stop on a non-finite loss (naming the step), clip, step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss is {loss.item()} (lower {lr_flag}?)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def train_reward_model(pipe, data, train_idx, args: Args, run, name: str = "reward", loss: str | None = None):
    """Fit the reward adapter + head with the pairwise loss at sigma ~ U(0, 1), same sigma and eps per pair."""
    tr, dev = pipe.transformer, pipe.transformer.device
    a = dataclasses.replace(args, loss=loss or args.loss)
    head, lora = add_reward_model(pipe, a, name)
    set_active_adapter(tr, name)
    params = lora + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.rm_lr, weight_decay=a.rm_weight_decay)  # constant lr (official)
    if a.ties == "drop":
        train_idx = train_idx[data["pref"][train_idx] < 2]
    steps = a.rm_steps if a.rm_steps > 0 else math.ceil(len(train_idx) / a.rm_batch)  # auto: one epoch
    g = torch.Generator().manual_seed(a.seed)
    timer = common.StepTimer(dev)
    bar = tqdm(range(steps), desc=f"stage 1 ({name}, {a.loss})")
    for step in bar:
        with timer:
            idx = train_idx[torch.randint(0, len(train_idx), (a.rm_batch,), generator=g)]
            win, lose, emb, mask, target = chosen_first(data, idx, dev)
            sigma = common.sample_train_sigma(len(idx), 1.0, generator=g, device=dev)  # uniform (paper)
            eps = torch.randn(win.shape, generator=g).to(dev)  # shared by both items of the pair
            r = dina_reward(tr, head, torch.cat([win, lose]), torch.cat([emb, emb]), torch.cat([mask, mask]),
                            [torch.cat([sigma, sigma])], torch.cat([eps, eps]), a.taps)
            r_win, r_lose = r.chunk(2)
            loss_value = preference_loss(r_win, r_lose, sigma, target, a).mean()
            update(opt, loss_value, params, a.grad_clip, f"stage 1 step {step}", "--rm-lr")
        acc = (r_win > r_lose).float()[target == 1].mean().item()
        bar.set_postfix(loss=f"{loss_value.item():.3f}", acc=f"{acc:.2f}")
        run.log(step, f"rm-{name}", loss=loss_value.item(), train_acc=acc)
    return head, lora, timer


@torch.no_grad()
def preference_accuracy(pipe, head, data, test_idx, sigmas, args: Args, batch: int = 64):
    """Held-out accuracy on strict pairs: r(preferred) > r(other), one eps per item (as the official eval)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    test_idx = test_idx[data["pref"][test_idx] < 2]
    g = torch.Generator().manual_seed(1234)  # the same noise for every model and level set
    correct = []
    for i in range(0, len(test_idx), batch):
        win, lose, emb, mask, _ = chosen_first(data, test_idx[i:i + batch], dev)
        x0, emb2, mask2 = torch.cat([win, lose]), torch.cat([emb, emb]), torch.cat([mask, mask])
        eps = torch.randn(x0.shape, generator=g).to(dev)
        r = dina_reward(tr, head, x0, emb2, mask2, sigmas, eps, args.taps).float().cpu()
        r_win, r_lose = r.chunk(2)
        correct.append((r_win > r_lose).float())
    return common.mean_se(torch.cat(correct))


# ----------------------------------------------------------------------------------------------
# Stage 2: ReFL with the learned reward (flow-grpo-rm train_sd3_refl_rm.py)
# ----------------------------------------------------------------------------------------------
def refl_loss(r, offset: float = 12.0, scale: float = 10.0):
    """Official ReFL objective: R = (r + offset) / scale, minimise mean(2 - R)."""
    return (2 - (r + offset) / scale).mean()


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


def refl_step(pipe, head, embeds, mask, args: Args, gen: torch.Generator, negative=None):
    """No-grad rollout to a random late step, one step with grad, x0-hat re-noised at sigma 0.4, scored."""
    tr, dev = pipe.transformer, pipe.transformer.device
    sigmas = common.sigma_schedule(args.num_steps, common.backbone_config(args.backbone)["flow_shift"])
    late = min(int(round(args.late_fraction * args.num_steps)), args.num_steps - 1)
    mid = int(torch.randint(late, args.num_steps, (1,), generator=gen))  # 40 steps: 30..39 (official)
    shape = (len(embeds), *common.backbone_geometry(pipe)["latent_shape"])
    noise = torch.randn(shape, generator=gen).to(dev)
    set_active_adapter(tr, "policy")
    with torch.no_grad():
        x, _ = common.rollout(tr, noise, embeds, sigmas, 0, mid, guidance_scale=args.guidance_scale,
                              negative_embeds=negative)
    v = common.predict_velocity(tr, x, sigmas[mid], embeds)  # the one step with gradient, no CFG (official)
    x0_hat = common.x0_from_velocity(x, v, sigmas[mid])
    eps = torch.randn(shape, generator=gen).to(dev)  # fresh noise for the reward's sigma = 0.4
    r = dina_reward(tr, head, x0_hat, embeds, mask, [args.score_sigma], eps, args.taps)
    set_active_adapter(tr, "policy")
    return refl_loss(r, args.reward_offset, args.reward_scale), r.detach(), mid


@torch.no_grad()
def evaluate_policy(pipe, head, embeds, mask, prompts, seeds, args: Args, negative=None):
    """Fresh samples from fixed seeds with the policy adapter: true toy reward (if toy) and DiNa score."""
    tr = pipe.transformer
    set_active_adapter(tr, "policy")
    z = common.sample_latents(pipe, embeds, seeds, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                              negative_embeds=negative)
    dev = tr.device
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4321)).to(dev)
    dina = dina_reward(tr, head, z.to(dev), embeds.to(dev), mask.to(dev), [args.score_sigma], eps, args.taps).cpu()
    true = toy.true_reward(pipe, z, prompts) if prompts is not None else None
    set_active_adapter(tr, "policy")
    return z, true, dina


def save_policy_lora(transformer, out_dir):
    """common.save_lora plus the adapter config, so load_lora_weights gets alpha (scale alpha / r = 2) right."""
    from diffusers import WanPipeline
    WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=common.lora_state_dict(transformer, "policy"),
                                  transformer_lora_adapter_metadata=transformer.peft_config["policy"].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def encode_eval_prompts(pipe, data, meta, args: Args):
    """Held-out prompts for stage 2 and the CFG negative, encoded once; then T5 can go before any training."""
    dev = pipe.transformer.device
    embeds, mask = data["prompt_embeds"], data["prompt_mask"]
    if str(meta.get("source", "")).startswith("toy"):  # held-out toy prompts (shape word 'patch'), never seen in ReFL
        eval_prompts = toy.toy_prompts("eval")
        eval_embeds, eval_mask = common.encode_prompts(pipe, eval_prompts, max_sequence_length=embeds.shape[1])
        train_rows = torch.arange(len(embeds))
    else:  # a real prompt table: hold out its last 10% (no ground-truth reward: report the DiNa score)
        k = max(1, len(embeds) // 10)
        eval_prompts, eval_embeds, eval_mask = None, embeds[-k:], mask[-k:]
        train_rows = torch.arange(len(embeds) - k)
    negative = None
    if args.guidance_scale > 1:
        negative = common.encode_prompts(pipe, [""], max_sequence_length=embeds.shape[1])[0].to(dev)
    return eval_prompts, eval_embeds, eval_mask, train_rows, negative


def run_refl(pipe, head, data, args: Args, run, prompts):
    """Stage 2: policy LoRA trained with ReFL on the training prompts; before/after on held-out prompts.
    `prompts`: what encode_eval_prompts returned."""
    tr, dev = pipe.transformer, pipe.transformer.device
    embeds, mask = data["prompt_embeds"], data["prompt_mask"]
    eval_prompts, eval_embeds, eval_mask, train_rows, negative = prompts
    toy = eval_prompts is not None  # toy prompts: the toy ground truth applies
    rows = [i for i in range(len(eval_embeds)) for _ in range(args.eval_seeds)]
    seeds = [10_000 + j for j in range(len(rows))]
    ev = lambda: evaluate_policy(pipe, head, eval_embeds[rows], eval_mask[rows],
                                 None if eval_prompts is None else [eval_prompts[i] for i in rows], seeds, args,
                                 negative)

    head.requires_grad_(False)  # the reward model is frozen in stage 2 (only its activations carry grad)
    tr.requires_grad_(False)
    policy = common.add_lora(tr, args.policy_rank, args.policy_alpha, adapter_name="policy")  # B = 0: the base
    if tr.is_gradient_checkpointing:  # one backward spans policy- and reward-adapter forwards: recompute each
        checkpoint_with_adapter(tr, set_active_adapter)  # block under its own adapter
    z_before, true_before, dina_before = ev()

    opt = torch.optim.AdamW(policy, lr=args.refl_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    timer = common.StepTimer(dev)
    bar = tqdm(range(args.refl_steps), desc="stage 2 (ReFL)")
    for step in bar:
        with timer:
            rows_b = train_rows[torch.randint(0, len(train_rows), (args.refl_batch,), generator=gen)]
            loss, r, mid = refl_step(pipe, head, embeds[rows_b].to(dev), mask[rows_b].to(dev), args, gen,
                                     None if negative is None else negative.expand(len(rows_b), -1, -1))
            update(opt, loss, policy, args.grad_clip, f"ReFL step {step}", "--refl-lr")
        bar.set_postfix(loss=f"{loss.item():.3f}", r=f"{r.mean().item():.2f}")
        run.log(step, "refl", loss=loss.item(), reward=r.mean().item(), mid_step=mid)
    z_after, true_after, dina_after = ev()
    save_policy_lora(tr, run.dir / "policy_lora")

    out = dict(refl_steps=args.refl_steps, refl_seconds_per_step=timer.seconds_per_step,
               eval_samples=len(rows))
    pairs = [("dina", dina_before, dina_after)] + ([("true", true_before, true_after)] if toy else [])
    for key, before, after in pairs:
        out[f"{key}_before"], out[f"{key}_before_se"] = common.mean_se(before)
        out[f"{key}_after"], out[f"{key}_after_se"] = common.mean_se(after)
        out[f"{key}_gain"], out[f"{key}_gain_se"] = common.mean_se(after - before)  # paired: same seeds
    if toy and args.save_videos:
        for tag, z in (("before", z_before), ("after", z_after)):
            for i in range(min(args.save_videos, len(z))):
                common.export_video(common.decode_latents(pipe, z[i:i + 1].to(dev))[0], run.dir / f"samples/{tag}_{i}.mp4")
    return out


# ----------------------------------------------------------------------------------------------
def estimate_memory(args: Args) -> dict:
    """--estimate-memory: train_reward_model's step on one pair and run_refl's step (batch 1, its no-grad rollout
    to the late step skipped and counted) on fake tensors at the backbone's size (estimate.StageEstimates)."""
    with estimate.StageEstimates("DiNa-LRM", args.backbone) as est:
        x0, emb, mask = est.inputs()

        def build(refl: bool):
            pipe = est.pipeline(gradient_checkpointing=args.backbone != TINY)
            head, _ = add_reward_model(pipe, args)
            if refl:  # as run_refl: reward adapter and head frozen, a policy adapter
                head.requires_grad_(False)
                pipe.transformer.requires_grad_(False)
                common.add_lora(pipe.transformer, args.policy_rank, args.policy_alpha, adapter_name="policy")
                checkpoint_with_adapter(pipe.transformer, set_active_adapter)  # as run_refl
            return pipe, head

        def rm_step(pipe, head, x0, emb, mask):  # one pair (A = B: only the shapes matter), same sigma and eps
            sigma, eps, two = torch.rand(1), torch.randn_like(x0), lambda t: torch.cat([t, t])
            r = dina_reward(pipe.transformer, head, two(x0), two(emb), two(mask), [two(sigma)], two(eps), args.taps)
            preference_loss(*r.chunk(2), sigma, torch.ones(1), args).mean().backward()

        short = dataclasses.replace(args, num_steps=1, late_fraction=0.0)  # mid = 0: no no-grad rollout
        late = min(int(round(args.late_fraction * args.num_steps)), args.num_steps - 1)
        est.step("reward-model step (pair)", rm_step, *est.build(lambda: build(False)), x0, emb, mask)
        est.step("ReFL step", lambda *a: refl_step(*a, short, torch.Generator())[0].backward(),
                 *est.build(lambda: build(True)), emb, mask,
                 rollout_forwards=(late + args.num_steps - 1) / 2 * (1 + (args.guidance_scale > 1)))  # E[mid] x CFG
    return est.results


def main(args: Args) -> dict:
    args = resolve(args)
    if args.estimate_memory:
        return estimate_memory(args)
    common.seed_everything(args.seed)
    if args.stage == "tune" and not args.reward_ckpt:
        raise SystemExit("--stage tune needs --reward-ckpt (a reward_model.safetensors from --stage rm)")
    if args.reward_ckpt and not Path(args.reward_ckpt).is_file():
        raise FileNotFoundError(f"--reward-ckpt {args.reward_ckpt}: no such file (write one with --stage rm)")
    dev = common.pick_device(args.device)
    memory = common.StepTimer(dev)  # resets the CUDA peak-memory counter
    pipe = common.load_backbone(args.backbone, dev)
    if args.backbone != TINY:
        pipe.transformer.enable_gradient_checkpointing()  # LoRA backprop through 12 blocks of real video tokens
    run = common.Run("dina_lrm", args, args.out_dir or None)
    data, meta = load_pairs(pipe, args)  # before any adapter: the toy world samples the plain generator
    train_idx, test_idx = common.split_indices(len(data["pref"]), args.test_fraction, args.seed)
    summary = dict(backbone=args.backbone, pairs=len(data["pref"]),
                   test_strict_pairs=int((data["pref"][test_idx] < 2).sum()), run_dir=str(run.dir))
    if not args.reward_ckpt and summary["test_strict_pairs"] == 0:
        raise ValueError(f"{args.data or 'toy data'}: no strict pair in the held-out split (raise --test-fraction)")
    prompts = encode_eval_prompts(pipe, data, meta, args) if args.stage in ("tune", "all") else None
    common.drop_text_encoder(pipe)  # every prompt is encoded: UMT5-XXL (5.7B, fp32) leaves before training
    rows = []

    if args.reward_ckpt:
        head, _ = load_reward_model(args.reward_ckpt, pipe, args)
    else:
        models = [("reward", args.loss)] + ([("ablation", "thurstone-constant")] if args.ablation == "on" else [])
        for name, loss in models:
            head, lora, timer = train_reward_model(pipe, data, train_idx, args, run, name, loss)
            levels = [[s] for s in args.eval_sigmas] + [args.ensemble_sigmas]
            for sig in levels:
                acc, se = preference_accuracy(pipe, head, data, test_idx, sig, args)
                label = f"ensemble {sig}" if len(sig) > 1 else f"sigma {sig[0]}"
                rows.append(dict(model=f"{name} ({loss})", scoring=label, accuracy=acc, se=se))
                key = "ensemble" if len(sig) > 1 else f"sigma_{sig[0]}"
                summary[f"acc_{key}" if name == "reward" else f"{name}_acc_{key}"] = acc
            summary[f"{name}_rm_seconds_per_step"] = timer.seconds_per_step
            if name == "reward":
                save_reward_model(run.dir / "reward_model.safetensors", pipe.transformer, head, args)
                reward_head = head
            else:
                set_active_adapter(pipe.transformer, "reward")
                pipe.transformer.delete_adapters(name)  # the ablation is only measured
        head = reward_head
        print(common.format_table(rows, ["model", "scoring", "accuracy", "se"]))

    if args.stage in ("tune", "all"):
        summary.update(run_refl(pipe, head, data, args, run, prompts))
        if "true_before" in summary:
            print(common.format_table([
                dict(samples="before ReFL", true_reward=summary["true_before"], se=summary["true_before_se"],
                     dina_reward=summary["dina_before"]),
                dict(samples="after ReFL", true_reward=summary["true_after"], se=summary["true_after_se"],
                     dina_reward=summary["dina_after"]),
                dict(samples="gain (paired)", true_reward=summary["true_gain"], se=summary["true_gain_se"],
                     dina_reward=summary["dina_gain"])]))
    summary["peak_memory_gib"] = memory.peak_memory_gib()
    summary["accuracy_table"] = rows
    run.summary(summary)
    print(f"summary: {run.dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(common.parse_args(Args))
