"""DiNa-LRM: "Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling" (arXiv 2602.11146).

A reward model inside the generator: its first 12 DiT blocks (with a LoRA adapter) read a noisy latent x_sigma;
the hidden states after blocks 4, 8, 12, FiLM-modulated by the timestep, are read by a gated query head into a
scalar r(x_sigma, sigma, c), trained on preference pairs with a Thurstone likelihood whose comparison noise grows
with the diffusion noise. It scores at sigma = 0.4, or reads three noise levels in one head pass (ensembling).
Then it is the reward of ReFL: no-grad rollout to a random late step, one step with grad, x0-hat scored.

Equation -> code (numbered in the order the method section derives them; the arXiv HTML was not recoverable)
    Eq. (1)  sigma_u^2(sigma) = k sigma^2 + sigma_u^2          -> thurstone_variance
    Eq. (2)  P(A > B) = Phi((r_A - r_B) / sqrt(2 sigma_u^2))   -> thurstone_probability
    Eq. (3)  L_fid = 1 - sqrt(P)  (FRank fidelity)             -> thurstone_fidelity_loss
             ablations: fixed variance (0.5), Bradley-Terry   -> --loss thurstone-constant | bt (preference_loss)
    Sec. 3   FiLM taps + gated query head                     -> FiLMTap, QueryAttention, DiNaHead
    Sec. 3   r(x_sigma, sigma, c), noise ensembling           -> dina_reward (several sigmas = ensemble)
    Sec. 3   training step: one sigma and eps per pair        -> rm_step (the loop body of train_reward_model)
    Sec. 5   ReFL with the learned reward, loss 2 - (r+12)/10 -> refl_loss, refl_step (the loop body of run_refl)

Follows the official code (HKUST-C4G/diffusion-rm, flow-grpo-rm) where it is more specific than the paper:
variance 2 sigma^2 + 0.05 (not 0.1^2), 1e-6 guards in the sqrt's, fidelity loss (the NLL is disabled there), one
sigma and eps shared by a pair and one eps by the ensemble's levels, no EMA (the released trainer never applies
it), the reward (r + 12) / 10 of its RL reward function, ReFL's gradient accumulation (4), and weight sharing: the
reward model is a peft adapter ("reward") on the generator's own blocks, the policy LoRA another ("policy").
Wan port (the paper is on SD3.5-M images): one text tap (Wan's text is fixed after the condition embedder), FiLM
on Wan's time embedding, a key-padding mask for the text. Deliberate differences: ties (none officially) are
dropped or trained with the FRank target 1/2 (--ties); one process: the official global batches are --rm-batch
and --batch-size x --grad-accum; --rm-steps is a plain count (paper: one epoch of ~0.8M pairs at 32 = 25k).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import common
import dataset
import estimate
import toy
from common import UserError, arg

warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # two adapters: the point here
LOSSES = ["thurstone", "thurstone-constant", "bt"]  # preference_loss's modes
SHAPE_KEYS = ("rm_blocks", "taps", "rm_lora_rank", "rm_lora_alpha", "num_queries", "num_heads")  # fix the tensors
SIZE = ("height", "width", "num_frames")


@dataclasses.dataclass
class Args:
    # generic
    stage: str = arg("all", "rm: reward model; tune: ReFL (needs --reward-ckpt); all", choices=["rm", "tune", "all"])
    out_dir: str = arg("", "run directory (default runs/dina_lrm-<backbone>-<time>)")
    seed: int = arg(0, "seed of everything (data split, sigmas, noise, rollouts)", min=0, max=2**32 - 1)
    device: str = arg("auto", "cuda | cpu | auto")
    data: str = arg("", "a prepared 'pairs' dataset folder (prepare.py); empty = the toy world (tiny only)")
    on_duplicates: str = arg("fail", "repeated or contradicting pairs in --data: fail | drop", choices=["fail", "drop"])
    toy_size: int = arg(2048, "pairs in the toy dataset (without --data); ~30% are strict, the rest ties", min=2)
    toy_cache: str = arg("runs/toy_data", "cache folder of the toy dataset")
    reward_ckpt: str = arg("", "reward_model.safetensors of an earlier run: skip stage 1 and use it")
    estimate_memory: bool = arg(False, "only print the estimated peak GPU memory and TFLOPs of each stage's step")
    max_steps: int = arg(None, "cap on the optimiser steps of every stage (with --eval-samples 2: a smoke run)",
                         type=int, min=1)
    # backbone
    backbone: str = arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder | a hub id")
    dtype: str = arg(None, "DiT dtype (default bf16 on CUDA, fp32 on CPU); LoRA, head, VAE: fp32", type=str,
                     choices=["bf16", "fp32"])
    height: int = arg(None, "video height (default: the size --data was prepared at, else the backbone's)",
                      type=int, min=1)
    width: int = arg(None, "video width (default as --height)", type=int, min=1)
    num_frames: int = arg(None, "video frames, 4k+1 (default as --height)", type=int, min=1)
    gradient_checkpointing: bool = arg(True, "block gradient checkpointing in both stages (memory for compute)")
    # reward model (Sec. 3; official config sd3m/thurstone-12layer.yaml)
    rm_blocks: int = arg(12, "first DiT blocks the reward model keeps (and puts its LoRA on)", min=1)
    taps: list = arg(None, "1-based blocks whose hidden states the head reads", factory=lambda: [4, 8, 12], min=1,
                     nonempty=True)
    rm_lora_rank: int = arg(64, "reward LoRA rank", min=1)
    rm_lora_alpha: float = arg(128.0, "reward LoRA alpha", gt=0)
    num_queries: int = arg(4, "learnable queries of the head", min=1)
    num_heads: int = arg(8, "attention heads of the head", min=1)
    loss: str = arg("thurstone", "Eq. 1-3 | fixed-variance ablation | Bradley-Terry", choices=LOSSES)
    k: float = arg(2.0, "Eq. (1): slope k of the noise-dependent comparison variance", min=0)
    clean_var: float = arg(0.05, "Eq. (1): comparison variance at sigma = 0 (official; paper text 0.1^2)", min=0)
    constant_var: float = arg(0.5, "variance of the thurstone-constant ablation (official code)", min=0)
    ties: str = arg("drop", "tied pairs: drop (none officially) | half (FRank target 1/2)", choices=["drop", "half"])
    rm_lr: float = arg(5e-5, "AdamW lr, constant (paper)", gt=0)
    rm_weight_decay: float = arg(0.01, "AdamW weight decay (official)", min=0)
    rm_batch: int = arg(32, "pairs per micro-batch (official: 4 per GPU x 8 GPUs)", min=1)
    rm_grad_accum: int = arg(1, "micro-batches per optimiser step (official: none)", min=1)
    rm_steps: int = arg(25_000, "optimiser steps (paper: one epoch of ~0.8M HPDv3 pairs at 32 pairs per step)", min=1)
    grad_clip: float = arg(1.0, "gradient-norm clip of both stages (official)", gt=0)
    test_fraction: float = arg(0.2, "held-out share of the pairs for the accuracy table", gt=0, max=0.99)
    score_sigma: float = arg(0.4, "sigma of a single-draw score (official default for generated latents)", min=0, max=1)
    eval_sigmas: list = arg(None, "single-draw accuracy sweep", factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8], min=0,
                            max=1, nonempty=True)
    ensemble_sigmas: list = arg(None, "noise-ensemble levels", factory=lambda: [0.2, 0.5, 0.7], min=0, max=1,
                                nonempty=True)
    ablation: bool = arg(False, "also train the fixed-variance ablation (thurstone-constant) for the accuracy table")
    # fine-tuning: ReFL with the learned reward (flow-grpo-rm config/refl.py)
    tune_steps: int = arg(150, "ReFL optimiser steps (paper)", min=1)
    batch_size: int = arg(16, "prompts per ReFL micro-batch (official: 2 per GPU x 8 GPUs)", min=1)
    grad_accum: int = arg(4, "ReFL micro-batches per optimiser step (official)", min=1)
    lr: float = arg(1e-4, "policy AdamW lr (official)", gt=0)
    policy_rank: int = arg(32, "policy LoRA rank (official)", min=1)
    policy_alpha: float = arg(64.0, "policy LoRA alpha (official)", gt=0)
    num_steps: int = arg(40, "sampling steps of rollout and evaluation (official)", min=1)
    late_fraction: float = arg(0.75, "grad step drawn from [late_fraction * num_steps, num_steps - 1]", min=0, max=1)
    guidance_scale: float = arg(4.5, "CFG of the no-grad rollout and the evaluation samples (official; 1 = off)", min=1)
    reward_offset: float = arg(12.0, "ReFL reward R = (r + offset) / scale, loss = mean(2 - R) (official)")
    reward_scale: float = arg(10.0, "see --reward-offset", gt=0)
    eval_samples: int = arg(64, "fresh before/after evaluation samples, held-out prompts in blocks (ours)", min=1)
    save_videos: int = arg(2, "mp4 samples to write before and after ReFL (into <run>/videos/)", min=0)


# --backbone tiny: a CPU-sized demo (python dina_lrm.py). ReFL: 80 or 160 steps, or lr 1e-3, game its reward model.
TINY = dict(rm_lr=1e-3, rm_steps=300, tune_steps=40, batch_size=8, grad_accum=1, lr=5e-5, num_steps=20,
            guidance_scale=1.0, eval_samples=96, ablation=True, gradient_checkpointing=False)


# ==== The noise-calibrated Thurstone likelihood (Sec. 3.2)
def thurstone_variance(sigma, k: float = 2.0, clean_var: float = 0.05):
    """Eq. (1): per-item comparison variance k sigma^2 + sigma_u^2: a noisier latent is judged less surely."""
    return k * sigma ** 2 + clean_var


def thurstone_probability(r_a, r_b, var):
    """Eq. (2): P(A > B) = Phi((r_A - r_B) / sqrt(2 var)) (both items carry the variance; 1e-6 as the code)."""
    return torch.special.ndtr((r_a - r_b) / torch.sqrt(2 * var + 1e-6))


def thurstone_fidelity_loss(p, target=1.0):
    """Eq. (3): FRank fidelity 1 - sqrt(y p) - sqrt((1-y)(1-p)); y = 1 (A preferred) gives 1 - sqrt(p). Bounded
    (unlike -log p), so confidently wrong labels cannot dominate; y = 1/2 is our tie target."""
    target = torch.as_tensor(target, dtype=p.dtype, device=p.device)
    return 1 - torch.sqrt(target * p + 1e-6) - torch.sqrt((1 - target) * (1 - p) + 1e-6) * (target < 1)


def preference_loss(r_a, r_b, sigma, target, args: Args):
    """The training loss per pair for --loss (A = the preferred item when target = 1); the one place a fork of
    the loss goes: training, the ablation and --estimate-memory all call it through rm_step."""
    if args.loss == "bt":  # Bradley-Terry ablation, -log sigmoid(r_A - r_B) (ties: soft target)
        return F.binary_cross_entropy_with_logits(r_a - r_b, torch.as_tensor(target, dtype=r_a.dtype).expand_as(r_a),
                                                  reduction="none")
    var = (thurstone_variance(sigma, args.k, args.clean_var) if args.loss == "thurstone"
           else torch.full_like(sigma, args.constant_var))
    return thurstone_fidelity_loss(thurstone_probability(r_a, r_b, var), target)


# ==== Reward head: FiLM-modulated multi-tap features, read by 4 queries (Sec. 3.1, official RewardHead)
class FiLMTap(nn.Module):
    """x (1 + gamma(temb)) + beta(temb) + layer embedding, then reduced to width/4. The last FiLM layer starts at
    zero: training starts from the backbone's own features (plus the layer embedding) at every noise level."""
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
    """Queries attend to video tokens and (gated=True) to text tokens: two softmaxes (video and text do not compete
    in one), summed; value gates let the head ignore uninformative tokens (Qiu et al. 2025, as the official head)."""
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
        q = self.attn2(self.attn1(self.queries.expand(len(video), -1, -1), video, text, mask), video)  # attn1, attn2
        q = q + self.ffn(self.ffn_norm(q))
        return self.to_reward(q).squeeze(-1).mean(1)  # per-query scalar, averaged over queries


# ==== Adapters: the reward model and the policy share the generator's base weights
def set_active_adapter(transformer, name: str):
    """transformer.set_adapter(name), keeping every requires_grad: peft's would make the active adapter trainable
    and freeze the others (the reward adapter would get gradients in ReFL, the policy none after it)."""
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.set_adapter(name)
    for p, f in flags:
        p.requires_grad_(f)


def dina_reward(transformer, head, x0, embeds, text_mask, sigmas, eps, taps):
    """r(x_sigma, sigma, c) with the reward adapter; several sigmas (floats or [B] tensors) = noise ensembling (one
    eps for all). Gradient flows to x0 (ReFL) and to whatever is trainable."""
    set_active_adapter(transformer, head.adapter)
    feats = []
    for s in sigmas:  # x_sigma = (1 - sigma) x0 + sigma eps; the transformer's timestep is 1000 sigma
        t = 1000 * torch.as_tensor(s, dtype=torch.float32, device=x0.device)
        feats.append(common.dit_prefix_features(transformer, common.add_noise(x0, eps, s), t, embeds, taps=tuple(taps)))
    return head(feats, text_mask)


def add_reward_model(pipe, args: Args, name: str = "reward"):
    """Reward LoRA on the kept blocks + a new head; returns (head, lora params)."""
    params = common.add_lora(pipe.transformer, args.rm_lora_rank, args.rm_lora_alpha, adapter_name=name,
                             blocks=list(range(args.rm_blocks)))
    cfg = pipe.transformer.config
    return DiNaHead(cfg.num_attention_heads * cfg.attention_head_dim, len(args.taps), args.num_queries, args.num_heads,
                    name).to(pipe.transformer.device), params


def save_reward_model(path, transformer, head, args: Args, name: str = "reward"):
    """One safetensors file: head.* and the reward adapter's lora.* (+ the shape args and the loss as metadata)."""
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors.update({f"lora.{k}": v for k, v in common.lora_state_dict(transformer, name).items()})
    common.save_safetensors(tensors, path, metadata={k: getattr(args, k) for k in (*SHAPE_KEYS, "loss", "backbone")})


def load_reward_model(path, pipe, args: Args):
    """Rebuild the reward adapter and head from save_reward_model's file (frozen, for ReFL)."""
    from peft.utils import set_peft_model_state_dict
    sd = load_file(str(path))  # its header was checked by check_reward_ckpt before any model loaded
    head, params = add_reward_model(pipe, args)
    try:
        head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    except RuntimeError as e:
        raise UserError(f"{path}: head weights do not fit this backbone ({str(e).splitlines()[1].strip()})")
    lora = {k[5:]: v for k, v in sd.items() if k.startswith("lora.")}
    result = set_peft_model_state_dict(pipe.transformer, lora, adapter_name="reward")
    if not lora or getattr(result, "unexpected_keys", None):
        raise UserError(f"{path}: reward LoRA keys missing or unexpected (lora.* tensors: {len(lora)})")
    return head, params


def optimiser_step(opt, params, micro_step, grad_accum: int, grad_clip: float, where: str):
    """One optimiser step of either stage: grad_accum micro-batches (each backpropagates loss / grad_accum: the
    gradient of the mean), clip, step. micro_step() -> (loss, extra); returns (mean loss, [extra, ...])."""
    opt.zero_grad(set_to_none=True)
    out = []
    for _ in range(grad_accum):
        loss, extra = micro_step()
        if not torch.isfinite(loss):
            raise UserError(f"{where}: loss is {loss.item()} (lower the learning rate)")
        (loss / grad_accum).backward()
        out.append((loss.detach(), extra))
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return torch.stack([loss for loss, _ in out]).mean().item(), [extra for _, extra in out]


# ==== Stage 1: train the reward model on preference pairs
def chosen_first(data, idx, device):
    """Batch of pairs ordered (preferred, other) with the target y: 1 for strict pairs, 1/2 for ties."""
    pref, a, b, p = data["pref"][idx], data["latents_a"][idx], data["latents_b"][idx], data["prompt_idx"][idx]
    swap = (pref == 1).view(-1, 1, 1, 1, 1)
    return tuple(t.to(device) for t in (torch.where(swap, b, a), torch.where(swap, a, b), data["prompt_embeds"][p],
                                        data["prompt_mask"][p], torch.where(pref == 2, 0.5, 1.0)))


def rm_step(transformer, head, win, lose, embeds, mask, target, args: Args, g: torch.Generator):
    """Stage 1's loss on a batch of pairs: sigma ~ U(0, 1) per pair (paper), one sigma and one eps shared by both
    items (official train_step), both scored in one batched pass. Returns (loss, r_win, r_lose)."""
    sigma = common.sample_train_sigma(len(win), 1.0, generator=g, device=win.device)
    eps = torch.randn(win.shape, generator=g).to(win.device)
    two = lambda t: torch.cat([t, t])
    r_win, r_lose = dina_reward(transformer, head, torch.cat([win, lose]), two(embeds), two(mask), [two(sigma)],
                                two(eps), args.taps).chunk(2)
    return preference_loss(r_win, r_lose, sigma, target, args).mean(), r_win, r_lose


def train_reward_model(pipe, data, train_idx, args: Args, run, name: str = "reward"):
    """Fit the reward adapter + head (--loss of `args`) with rm_step; constant lr (official)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    head, lora = add_reward_model(pipe, args, name)  # dina_reward activates its adapter
    params = lora + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.rm_lr, weight_decay=args.rm_weight_decay)
    train_idx = train_idx[data["pref"][train_idx] < 2] if args.ties == "drop" else train_idx
    g = torch.Generator().manual_seed(args.seed)

    def micro_step():
        idx = train_idx[torch.randint(0, len(train_idx), (args.rm_batch,), generator=g)]
        win, lose, emb, mask, target = chosen_first(data, idx, dev)
        loss, r_win, r_lose = rm_step(tr, head, win, lose, emb, mask, target, args, g)
        return loss, (r_win > r_lose).float()[target == 1]  # train accuracy on the strict pairs

    steps = min(args.rm_steps, args.max_steps or args.rm_steps)
    timer, bar = common.StepTimer(dev), tqdm(range(steps), desc=f"stage 1 ({name}, {args.loss})")
    for step in bar:
        with timer:
            loss, hits = optimiser_step(opt, params, micro_step, args.rm_grad_accum, args.grad_clip,
                                        f"stage 1 step {step} (--rm-lr {args.rm_lr})")
        acc = torch.cat(hits).mean().item()
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        run.log(step, f"rm-{name}", loss=loss, train_acc=acc)
    return head, timer


@torch.no_grad()
def preference_accuracy(pipe, head, data, test_idx, sigmas, args: Args, batch: int = 64):
    """Held-out accuracy on strict pairs: r(preferred) > r(other), one eps per item (as the official eval)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    test_idx = test_idx[data["pref"][test_idx] < 2]
    g, correct = torch.Generator().manual_seed(1234), []  # the same noise for every model and level set
    for i in range(0, len(test_idx), batch):
        win, lose, emb, mask, _ = chosen_first(data, test_idx[i:i + batch], dev)
        eps = torch.randn((2 * len(win), *win.shape[1:]), generator=g).to(dev)
        r_win, r_lose = dina_reward(tr, head, torch.cat([win, lose]), torch.cat([emb, emb]), torch.cat([mask, mask]),
                                    sigmas, eps, args.taps).float().cpu().chunk(2)
        correct.append((r_win > r_lose).float())
    return common.mean_se(torch.cat(correct))


def reward_model_stage(pipe, data, train_idx, test_idx, args: Args, run, summary: dict):
    """Stage 1: the reward model (and, with --ablation, the fixed-variance one), held-out accuracy per scoring
    (single sigmas, the noise ensemble) into `summary`. Returns (the reward head, table rows)."""
    rows = []
    for name, loss in [("reward", args.loss)] + [("ablation", "thurstone-constant")] * args.ablation:
        head, timer = train_reward_model(pipe, data, train_idx, dataclasses.replace(args, loss=loss), run, name)
        for sig in [[s] for s in args.eval_sigmas] + [args.ensemble_sigmas]:
            acc, se = preference_accuracy(pipe, head, data, test_idx, sig, args)
            key = "ensemble" if len(sig) > 1 else f"sigma_{sig[0]}"
            rows.append(dict(model=f"{name} ({loss})", scoring=f"ensemble {sig}" if len(sig) > 1 else f"sigma {sig[0]}",
                             accuracy=acc, se=se))
            summary[f"acc_{key}" if name == "reward" else f"{name}_acc_{key}"] = acc
        summary[f"{name}_rm_seconds_per_step"] = timer.seconds_per_step
        if name == "reward":
            save_reward_model(run.dir / "reward_model.safetensors", pipe.transformer, head, args)
            reward_head = head
        else:  # the ablation is only measured
            set_active_adapter(pipe.transformer, "reward")
            pipe.transformer.delete_adapters(name)
    return reward_head, rows


# ==== Stage 2: ReFL with the learned reward (flow-grpo-rm train_sd3_refl_rm.py)
def checkpoint_with_adapter(transformer, set_adapter):
    """Block gradient checkpointing that recomputes each block under the peft adapter active in its forward.
    diffusers recomputes under whatever adapter is active when backward runs; when one backward spans forwards
    under different adapters (ReFL: a policy-adapter step, then the reward-adapter blocks), torch.utils.checkpoint
    then raises a CheckpointError (or, with equal ranks, computes wrong gradients). set_adapter switches adapters."""
    from torch.utils.checkpoint import checkpoint

    def context_fn():  # (forward context, recompute context) of one checkpointed block
        name = transformer.active_adapters()[0]

        @contextlib.contextmanager
        def recompute():
            before = transformer.active_adapters()[0]
            set_adapter(transformer, name)
            yield
            set_adapter(transformer, before)
        return contextlib.nullcontext(), recompute()

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=lambda block, *a: checkpoint(
        block.__call__, *a, use_reentrant=False, context_fn=context_fn))


def add_policy(pipe, head, args: Args):
    """Stage 2's trainables: the reward model frozen (only its activations carry grad), a policy LoRA (B = 0: the
    base generator) on the whole generator; with checkpointing, each block recomputed under its own adapter."""
    head.requires_grad_(False)
    pipe.transformer.requires_grad_(False)
    policy = common.add_lora(pipe.transformer, args.policy_rank, args.policy_alpha, adapter_name="policy")
    if args.gradient_checkpointing:  # one backward spans policy- and reward-adapter forwards
        checkpoint_with_adapter(pipe.transformer, set_active_adapter)
    return policy


def refl_loss(r, offset: float = 12.0, scale: float = 10.0):
    """Official ReFL objective: R = (r + offset) / scale, minimise mean(2 - R)."""
    return (2 - (r + offset) / scale).mean()


def late_steps(args: Args) -> range:
    """The steps the one grad step is drawn from, [late_fraction * N, N - 1] (official: 40 steps -> 30..39)."""
    return range(min(int(round(args.late_fraction * args.num_steps)), args.num_steps - 1), args.num_steps)


def refl_step(pipe, head, embeds, mask, args: Args, gen: torch.Generator, negative=None):
    """No-grad rollout to a random late step, one step with grad, x0-hat re-noised at sigma 0.4, scored.
    Returns (loss, r, the step with grad)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    sigmas = common.sigma_schedule(args.num_steps, common.backbone_geometry(pipe)["flow_shift"])  # the checkpoint's
    mid = int(torch.randint(late_steps(args).start, args.num_steps, (1,), generator=gen))
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


def encode_eval_prompts(pipe, data, meta, args: Args):
    """Held-out prompts for stage 2 and the CFG negative, encoded once; then T5 can go before any training."""
    embeds, mask = data["prompt_embeds"], data["prompt_mask"]
    if str(meta.get("source", "")).startswith("toy"):  # held-out toy prompts (shape word 'patch'), never seen in ReFL
        eval_prompts = toy.toy_prompts("eval")
        eval_embeds, eval_mask = common.encode_prompts(pipe, eval_prompts, max_sequence_length=embeds.shape[1])
        train_rows = torch.arange(len(embeds))
    else:  # a real prompt table: hold out its last 10% (no ground-truth reward: report the DiNa score)
        k = max(1, len(embeds) // 10)
        eval_prompts, eval_embeds, eval_mask, train_rows = None, embeds[-k:], mask[-k:], torch.arange(len(embeds) - k)
    negative = (common.encode_prompts(pipe, [""], max_sequence_length=embeds.shape[1])[0].to(pipe.transformer.device)
                if args.guidance_scale > 1 else None)
    return eval_prompts, eval_embeds, eval_mask, train_rows, negative


def run_refl(pipe, head, data, args: Args, run, prompts, summary: dict):
    """Stage 2: policy LoRA trained with ReFL on the training prompts; before/after on held-out prompts, paired
    by seed, into `summary`. `prompts`: what encode_eval_prompts returned. Returns the table rows."""
    tr, dev = pipe.transformer, pipe.transformer.device
    eval_prompts, eval_embeds, eval_mask, train_rows, negative = prompts
    rows = [j * len(eval_embeds) // args.eval_samples for j in range(args.eval_samples)]  # consecutive blocks

    @torch.no_grad()
    def evaluate():  # fresh samples from fixed seeds with the policy: DiNa score, true toy reward (toy prompts)
        set_active_adapter(tr, "policy")
        z = common.sample_latents(pipe, eval_embeds[rows], [10_000 + j for j in range(len(rows))], args.num_steps,
                                  guidance_scale=args.guidance_scale, negative_embeds=negative)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4321)).to(dev)
        scores = {"true_reward": toy.true_reward(pipe, z, [eval_prompts[j] for j in rows])} if eval_prompts else {}
        scores["dina_reward"] = dina_reward(tr, head, z.to(dev), eval_embeds[rows].to(dev), eval_mask[rows].to(dev),
                                            [args.score_sigma], eps, args.taps).cpu()
        return z, scores

    def micro_step():
        b = train_rows[torch.randint(0, len(train_rows), (args.batch_size,), generator=gen)]
        loss, r, mid = refl_step(pipe, head, data["prompt_embeds"][b].to(dev), data["prompt_mask"][b].to(dev), args,
                                 gen, None if negative is None else negative.expand(len(b), -1, -1))
        return loss, (r, mid)

    policy = add_policy(pipe, head, args)
    z_before, before = evaluate()
    opt = torch.optim.AdamW(policy, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps = min(args.tune_steps, args.max_steps or args.tune_steps)
    timer, bar = common.StepTimer(dev), tqdm(range(steps), desc="stage 2 (ReFL)")
    for step in bar:
        with timer:
            loss, out = optimiser_step(opt, policy, micro_step, args.grad_accum, args.grad_clip,
                                       f"ReFL step {step} (--lr {args.lr})")
        r = torch.cat([o[0] for o in out]).mean().item()
        bar.set_postfix(loss=f"{loss:.3f}", r=f"{r:.2f}")
        run.log(step, "refl", loss=loss, reward=r, mid_step=[o[1] for o in out])
    z_after, after = evaluate()
    common.save_lora(tr, run.dir / "policy_lora", "policy")
    for tag, z in (("before", z_before), ("after", z_after)):
        for i in range(min(args.save_videos, len(z))):
            common.export_video(common.decode_latents(pipe, z[i:i + 1].to(dev))[0], run.dir / f"videos/{tag}_{i}.mp4")
    paired, table = common.paired_summary(before, after)
    summary.update(paired, tune_steps=steps, tune_seconds_per_step=timer.seconds_per_step,
                   eval_samples=len(rows))
    return table


def estimate_memory(args: Args) -> dict:
    """--estimate-memory: rm_step on one pair and refl_step (batch 1; num_steps 1: its no-grad rollout to the late
    step is skipped, and counted as E[mid] forwards, x2 with CFG) on fake tensors at the run's size (no data)."""
    def build(refl: bool):  # as main and run_refl set them up
        pipe = est.pipeline(gradient_checkpointing=args.gradient_checkpointing)
        head = add_reward_model(pipe, args)[0]
        return pipe, head, refl and add_policy(pipe, head, args)

    size = {k: getattr(args, k) for k in SIZE}
    check_fit(args, common.backbone_config(args.backbone), size)  # the size, --rm-blocks, --num-heads (no weights)
    with estimate.StageEstimates("DiNa-LRM", args.backbone, **size) as est:
        est.load_phase()
        x0, emb, mask = est.inputs()
        pipe, head, _ = est.build(lambda: build(False))
        est.step("reward-model step (pair)", lambda *a: rm_step(*a, args, torch.Generator())[0].backward(),
                 pipe.transformer, head, x0, x0, emb, mask, torch.ones(1))
        pipe, head, _ = est.build(lambda: build(True))
        short = dataclasses.replace(args, num_steps=1, late_fraction=0.0)  # mid = 0: no no-grad rollout
        est.step("ReFL step", lambda *a: refl_step(*a, short, torch.Generator())[0].backward(), pipe, head, emb, mask,
                 rollout_forwards=(late_steps(args).start + args.num_steps - 1) / 2 * (1 + (args.guidance_scale > 1)))
    return est.results


# ==== Input checks (issue #19): a user's mistake fails here, before any model loads or a run folder exists
def check_args(args: Args):
    """What arg(min=, gt=, ...) cannot say; exit code 2."""
    for bad, msg in [(max(args.taps) > args.rm_blocks, f"--taps {args.taps}: the reward model keeps --rm-blocks {args.rm_blocks}"),
                     (args.stage == "tune" and not args.reward_ckpt, "--stage tune needs --reward-ckpt (--stage rm)"),
                     (args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and
                      torch.cuda.is_available()), f"--device {args.device}: auto, cpu or (with a GPU here) cuda[:n]"),
                     (not (args.data or args.estimate_memory or args.backbone == "tiny"),
                      f"--backbone {args.backbone}: the toy world is tiny's; pass --data (from prepare.py)")]:
        common.require(not bad, msg, 2)


def read_pairs(args: Args):
    """--data: dataset.load (files, keys, rows, NaN/inf, prompt indices), 'pref' values, then dataset.drop_repeats
    (repeated rows, the same clips and prompt judged twice differently, a clip against itself with a winner)."""
    data, meta = dataset.load(args.data, "pairs")
    pref = data["pref"]
    bad = ((pref != 0) & (pref != 1) & (pref != 2)).nonzero()[:5, 0].tolist()
    common.require(not bad, f"{args.data}: 'pref' must be 0 (A better), 1 (B) or 2 (tie); rows {bad}: {pref[bad].tolist()}")
    data = dataset.drop_repeats(dict(data, pref=pref.long()), "pairs", args.on_duplicates, args.data)
    common.require(args.reward_ckpt or (data["pref"] < 2).any(), f"{args.data}: no strict pair (pref 0 or 1): every "
                   f"pair is a tie, and the reward model learns from strict pairs")
    return data, meta


def check_fit(args: Args, cfg: dict, size: dict, data=None, width=None, where=""):
    """Flags, data and a --reward-ckpt head's width against the backbone's config (no weights needed): the size
    (common.geometry: exit code 2 if the VAE and the patching cannot make it), the latents' shape and scale."""
    geo, tr = common.geometry(cfg, **size), cfg["transformer"]
    dim = tr["num_attention_heads"] * tr["attention_head_dim"]
    common.require(args.rm_blocks <= tr["num_layers"], f"--rm-blocks {args.rm_blocks}: the backbone has {tr['num_layers']}", 2)
    common.require(dim % args.num_heads == 0, f"--num-heads {args.num_heads}: must divide the backbone's width {dim}", 2)
    common.require(width in (None, dim), f"--reward-ckpt {args.reward_ckpt}: a head of width {width}, made for another "
                   f"backbone (this one: {dim})")
    if data is not None:
        dataset.check_latents(data, geo, where)
    return geo


def check_reward_ckpt(args: Args):
    """--reward-ckpt: a save_reward_model file (its header only) with this run's shape flags; returns its width."""
    path = args.reward_ckpt
    try:
        with safe_open(path, "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            width = f.get_slice("head.queries").get_shape()[-1] if "head.queries" in keys else None
    except (SafetensorError, OSError) as e:
        raise UserError(f"--reward-ckpt {path}: " + ("no such file (write one with --stage rm)" if not
                        Path(path).is_file() else f"not a safetensors file ({e})")) from None
    if any(k not in meta for k in SHAPE_KEYS) or width is None or not any(k.startswith("lora.") for k in keys):
        raise UserError(f"--reward-ckpt {path}: not a DiNa-LRM reward model (head/LoRA tensors or the metadata "
                        f"{list(SHAPE_KEYS)} missing); dina_lrm.py --stage rm writes one")
    for k in (k for k in SHAPE_KEYS if meta[k] != str(getattr(args, k))):
        raise UserError(f"{path}: trained with --{k.replace('_', '-')} {meta[k]}, this run has {getattr(args, k)} "
                        f"(pass the checkpoint's value)")
    return width


def check_split(data, meta, args: Args, where: str):
    """The fixed train / held-out split has what the stages need."""
    train, test = dataset.split_indices(len(data["pref"]), args.test_fraction, args.seed)
    strict = lambda idx: int((data["pref"][idx] < 2).sum())
    for bad, msg in [(not args.reward_ckpt and (strict(train) == 0 and args.ties == "drop" or len(train) == 0),
                      f"no strict pair among the {len(train)} training pairs (lower --test-fraction)"),
                     (not args.reward_ckpt and strict(test) == 0,
                      f"no strict pair among the {len(test)} held-out pairs (raise --test-fraction)"),
                     (args.stage != "rm" and not str(meta.get("source")).startswith("toy") and
                      len(data["prompt_embeds"]) < 2, "ReFL needs 2 prompts or more (a tenth is held out)")]:
        if bad:
            raise UserError(f"{where}: {msg}")
    return train, test


def main(args: Args) -> dict:
    check_args(args)
    if args.estimate_memory:
        return estimate_memory(args)
    # data, checkpoint, size and --out-dir first: a failed start costs seconds and leaves no run folder behind
    data, meta = read_pairs(args) if args.data else (None, {})
    size = dataset.video_size(meta, args.data, **{k: getattr(args, k) for k in SIZE})  # typed, else the data's
    width = check_reward_ckpt(args) if args.reward_ckpt else None
    hub_id = args.backbone.count("/") == 1 and not Path(args.backbone).expanduser().exists()
    cfg = None if hub_id else common.backbone_config(args.backbone)  # a folder's own config files, no weights
    if cfg:
        check_fit(args, cfg, size, data, width, args.data)
    split = data is not None and check_split(data, meta, args, args.data)
    common.check_writable(args.out_dir or "runs")
    common.seed_everything(args.seed)
    dev = common.pick_device(args.device)
    memory = common.StepTimer(dev)  # resets the CUDA peak-memory counter
    pipe = common.load_backbone(args.backbone, dev, common.pick_dtype(args.dtype, dev), **size)
    if data is None:  # the toy world, made by the plain tiny generator (before any adapter)
        data, meta = toy.toy_dataset(pipe, "pairs", args.toy_size, seed=args.seed, cache_dir=args.toy_cache)
    where = args.data or f"{args.toy_cache} (toy pairs)"
    geo = check_fit(args, pipe.wan_config, size, data, width, where)  # a hub id's config and a toy cache: only now
    train_idx, test_idx = split or check_split(data, meta, args, where)
    args = dataclasses.replace(args, **{k: geo[k] for k in SIZE})  # args.json records the size that runs
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    run = common.Run("dina_lrm", args, args.out_dir or None)
    summary = dict(backbone=args.backbone, pairs=len(data["pref"]),
                   test_strict_pairs=int((data["pref"][test_idx] < 2).sum()), run_dir=str(run.dir))
    prompts = encode_eval_prompts(pipe, data, meta, args) if args.stage != "rm" else None
    common.drop_text_encoder(pipe)  # every prompt is encoded: UMT5-XXL leaves before training
    if args.reward_ckpt:
        head, rows = load_reward_model(args.reward_ckpt, pipe, args)[0], []
    else:
        head, rows = reward_model_stage(pipe, data, train_idx, test_idx, args, run, summary)
        print(common.format_table(rows, ["model", "scoring", "accuracy", "se"]))
    if args.stage != "rm":
        print(common.format_table(run_refl(pipe, head, data, args, run, prompts, summary)))
    summary.update(peak_memory_gib=memory.peak_memory_gib(), accuracy_table=rows)
    run.summary(summary)
    base = f"WanPipeline.from_pretrained('{pipe.wan_config['repo']}')" if pipe.wan_config["repo"] else "pipe"
    print(f"summary: {run.dir / 'summary.json'}" + (not args.reward_ckpt) * f"\nreward model (--stage tune "
          f"--reward-ckpt): {run.dir / 'reward_model.safetensors'}" + (args.stage != "rm") * f"\npolicy LoRA: "
          f"{run.dir / 'policy_lora'} (load: {base}.load_lora_weights('{run.dir / 'policy_lora'}'))")
    return summary


if __name__ == "__main__":
    common.cli(main, Args, TINY)
