"""DiNa-LRM: "Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling" (arXiv 2602.11146).

A reward model inside the generator: its first 12 DiT blocks (a LoRA adapter) read a noisy latent x_sigma; a gated
query head reads their states after blocks 4, 8, 12 (FiLM on the timestep) into r(x_sigma, sigma, c), trained on
preference pairs with a Thurstone likelihood whose comparison noise grows with sigma. It scores at sigma = 0.4 or
reads three levels in one head pass (ensembling); then it is the reward of ReFL (one late step with grad, x0-hat).

Equation -> code (numbered in the order the method section derives them; the arXiv HTML was not recoverable)
    Eq. (1)  sigma_u^2(sigma) = k sigma^2 + sigma_u^2          -> thurstone_variance
    Eq. (2)  P(A > B) = Phi((r_A - r_B) / sqrt(2 sigma_u^2))   -> thurstone_probability
    Eq. (3)  L_fid = 1 - sqrt(P)  (FRank fidelity)             -> thurstone_fidelity_loss
             ablations: fixed variance (0.5), Bradley-Terry   -> --loss thurstone-constant | bt (preference_loss)
    Sec. 3   FiLM taps + gated query head                     -> FiLMTap, QueryAttention, DiNaHead
    Sec. 3   r(x_sigma, sigma, c), noise ensembling           -> dina_reward (several sigmas = ensemble)
    Sec. 3   training step: one sigma and eps per pair        -> rm_step (the loop body of reward_model_stage)
    Sec. 5   ReFL with the learned reward, loss 2 - (r+12)/10 -> refl_loss, refl_step (the loop body of run_refl)
    official-code choices, our differences (EMA, Wan port, ties) -> docs/dina_lrm.md, "Differences"
"""
from __future__ import annotations

import contextlib, dataclasses, warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import common, dataset, estimate, rundir, toy
from common import UserError, arg

warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # two adapters: the point here
PAIR_KEYS = ["latents_a", "latents_b", "pref", "prompt_idx"]  # what stage 1 reads of a pair (dataset.batches)
SHAPE_KEYS = ("rm_blocks", "taps", "rm_lora_rank", "rm_lora_alpha", "num_queries", "num_heads")  # fix the tensors


@dataclasses.dataclass
class Args:
    stage: str = arg("all", "rm: reward model; tune: ReFL (needs --reward-ckpt); all", choices=["rm", "tune", "all"])
    out_dir: str = arg("", "run folder (default: a new runs/dina_lrm-<backbone>-<time>)")
    resume: bool = arg(False, "continue the run in --out-dir from its stages' checkpoints (same arguments)")
    checkpoint_every: int = arg(100, "optimiser steps between a stage's checkpoints (also: at its end, Ctrl-C)", min=1)
    seed: int = arg(0, "seed of everything (data split, sigmas, noise, rollouts)", min=0, max=2**32 - 1)
    device: str = arg("auto", "cuda | cpu | auto")
    data: str = arg("", "a prepared 'pairs' dataset folder (prepare.py); empty = the toy world (tiny only)")
    on_duplicates: str = arg("fail", "repeated or contradicting pairs in --data: fail | drop", choices=["fail", "drop"])
    toy_size: int = arg(1024, "pairs in the toy dataset (without --data); ~70% are strict, the rest ties", min=2)
    toy_cache: str = arg("runs/toy_data", "cache folder of the toy dataset")
    reward_ckpt: str = arg("", "reward_model.safetensors of an earlier run: skip stage 1 and use it")
    estimate_memory: bool = arg(False, "only print the estimated peak GPU memory and TFLOPs of each stage's step")
    max_steps: int = arg(None, "stop every stage after this many optimiser steps (a smoke run)", type=int, min=1)
    backbone: str = arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder | a hub id")
    dtype: str = arg(None, "DiT dtype (default: bf16 on CUDA, fp32 on CPU)", type=str, choices=["bf16", "fp32"])
    height: int = arg(None, "video height (default: the size of --data, else the backbone's)", type=int, min=1)
    width: int = arg(None, "video width (default as --height)", type=int, min=1)
    num_frames: int = arg(None, "video frames, 4k+1 (default as --height)", type=int, min=1)
    gradient_checkpointing: bool = arg(True, "block gradient checkpointing in both stages (memory for compute)")
    lora_init: str = arg("gaussian", "LoRA A init: N(0, 1/r) (official) | peft's", choices=["gaussian", "kaiming"])
    # reward model (Sec. 3; official config sd3m/thurstone-12layer.yaml)
    rm_blocks: int = arg(12, "first DiT blocks the reward model keeps (and puts its LoRA on)", min=1)
    taps: list = arg(None, "1-based blocks the head reads after", factory=lambda: [4, 8, 12], min=1, nonempty=True)
    rm_lora_rank: int = arg(64, "reward LoRA rank", min=1)
    rm_lora_alpha: float = arg(128.0, "reward LoRA alpha", gt=0)
    num_queries: int = arg(4, "learnable queries of the head", min=1)
    num_heads: int = arg(8, "attention heads of the head", min=1)
    loss: str = arg("thurstone", "Eq. 1-3 | ablations", choices=["thurstone", "thurstone-constant", "bt"])
    k: float = arg(2.0, "Eq. (1): slope k of the noise-dependent comparison variance", min=0)
    clean_var: float = arg(0.05, "Eq. (1): comparison variance at sigma = 0 (official; paper text 0.1^2)", min=0)
    ties: str = arg("drop", "tied pairs: drop (none officially) | half (FRank target 1/2)", choices=["drop", "half"])
    rm_lr: float = arg(5e-5, "AdamW lr, constant (paper)", gt=0)
    rm_weight_decay: float = arg(0.01, "AdamW weight decay (official)", min=0)
    rm_batch: int = arg(32, "pairs per micro-batch (official: 4 per GPU x 8 GPUs)", min=1)
    rm_grad_accum: int = arg(1, "micro-batches per optimiser step (official: none)", min=1)
    rm_steps: int = arg(25_000, "optimiser steps (paper: one epoch of ~0.8M HPDv3 pairs at 32 pairs per step)", min=1)
    grad_clip: float = arg(1.0, "gradient-norm clip of both stages (official)", gt=0)
    test_fraction: float = arg(0.2, "held-out share of the pairs for the accuracy table", gt=0, max=0.99)
    score_sigma: float = arg(0.4, "sigma of a single-draw score (official default for generated latents)", min=0, max=1)
    eval_sigmas: list = arg(None, "single draw", factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8], min=0, max=1, nonempty=True)
    ensemble_sigmas: list = arg(None, "ensemble levels", factory=lambda: [0.2, 0.5, 0.7], min=0, max=1, nonempty=True)
    ablation: bool = arg(False, "also train the fixed-variance ablation (thurstone-constant) for the accuracy table")
    # fine-tuning: ReFL with the learned reward (flow-grpo-rm config/refl.py)
    tune_steps: int = arg(150, "ReFL optimiser steps (paper)", min=1)
    batch_size: int = arg(16, "prompts per ReFL micro-batch (official: 2 per GPU x 8 GPUs)", min=1)
    grad_accum: int = arg(4, "ReFL micro-batches per optimiser step (official)", min=1)
    lr: float = arg(1e-4, "policy AdamW lr (official)", gt=0)
    weight_decay: float = arg(1e-4, "policy AdamW weight decay (official)", min=0)
    ema: bool = arg(True, "evaluate and save the policy's EMA (official: 0.9, every 8 steps), not its last weights")
    policy_rank: int = arg(32, "policy LoRA rank (official)", min=1)
    policy_alpha: float = arg(64.0, "policy LoRA alpha (official)", gt=0)
    num_steps: int = arg(40, "sampling steps of rollout and evaluation (official)", min=1)
    late_fraction: float = arg(0.75, "grad step drawn from [late_fraction * num_steps, num_steps - 1]", min=0, max=1)
    guidance_scale: float = arg(4.5, "CFG of the no-grad rollout and the evaluation samples (official; 1 = off)", min=1)
    eval_samples: int = arg(64, "fresh before/after evaluation samples, held-out prompts in blocks (ours)", min=1)
    save_videos: int = arg(2, "mp4 samples to write before and after ReFL (into <run>/videos/)", min=0)


# --backbone tiny: the CPU demo; ReFL 20 steps, before it games the demo reward model on both CPUs tried (docs); no EMA
TINY = dict(rm_lr=1e-3, rm_steps=300, tune_steps=20, batch_size=8, grad_accum=1, lr=2e-4, ema=False, num_steps=10,
            guidance_scale=1.0, eval_samples=768, gradient_checkpointing=False, checkpoint_every=50)


# ==== The noise-calibrated Thurstone likelihood (Sec. 3.2)
def thurstone_variance(sigma, k: float = 2.0, clean_var: float = 0.05):
    """Eq. (1): per-item comparison variance k sigma^2 + sigma_u^2: a noisier latent is judged less surely."""
    return k * sigma ** 2 + clean_var


def thurstone_probability(r_a, r_b, var):
    """Eq. (2): P(A > B) = Phi((r_A - r_B) / sqrt(2 var)) (both items carry the variance; 1e-6 as the code)."""
    return torch.special.ndtr((r_a - r_b) / torch.sqrt(2 * var + 1e-6))


def thurstone_fidelity_loss(p, target=1.0):
    """Eq. (3): FRank fidelity 1 - sqrt(y p) - sqrt((1-y)(1-p)), bounded (unlike -log p); y = 1/2: our tie target."""
    return 1 - torch.sqrt(target * p + 1e-6) - torch.sqrt((1 - target) * (1 - p) + 1e-6) * (target < 1)


def preference_loss(r_a, r_b, sigma, target, args: Args):
    """The loss per pair for --loss (A preferred when target = 1): the one place a fork of the loss goes."""
    if args.loss == "bt":  # Bradley-Terry ablation, -log sigmoid(r_A - r_B) (ties: soft target)
        return F.binary_cross_entropy_with_logits(r_a - r_b, torch.zeros_like(r_a) + target, reduction="none")
    var = thurstone_variance(sigma, args.k, args.clean_var) if args.loss == "thurstone" else torch.full_like(sigma, 0.5)
    return thurstone_fidelity_loss(thurstone_probability(r_a, r_b, var), target)


# ==== Reward head: FiLM-modulated multi-tap features, read by 4 queries (Sec. 3.1, official RewardHead)
def value_gate(dim: int) -> nn.Module:
    """A per-token scalar gate sigmoid(MLP(x)) on the values; its last layer starts at zero, so it starts at 1/2."""
    gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1), nn.Sigmoid())
    nn.init.zeros_(gate[2].weight), nn.init.zeros_(gate[2].bias)
    return gate


class FiLMTap(nn.Module):
    """x (1 + gamma(temb)) + beta(temb) + layer embedding, reduced to width/4; FiLM starts as the identity."""
    def __init__(self, dim: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(cond_dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim))
        nn.init.zeros_(self.cond[-1].weight), nn.init.zeros_(self.cond[-1].bias)
        self.layer_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.reduce = nn.Linear(dim, out_dim)

    def modulate(self, x, temb):
        gamma, beta = self.cond(temb)[:, None].chunk(2, -1)
        return x * (1 + gamma) + beta + self.layer_embed

    def forward(self, x, temb):
        return self.reduce(self.modulate(x, temb))


class QueryAttention(nn.Module):
    """Queries attend to video and (gated) text tokens: two softmaxes, summed; value gates (Qiu et al. 2025)."""
    def __init__(self, dim: int, heads: int, gated: bool):
        super().__init__()
        self.heads, self.gated = heads, gated
        self.norm_q, self.norm_v = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.to_q, self.k_v, self.v_v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        if gated:
            self.norm_t = nn.RMSNorm(dim)
            self.k_t, self.v_t = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.gate_v, self.gate_t = value_gate(dim), value_gate(dim)

    def attend(self, q, k, v, mask=None):  # multi-head SDPA of [B, Nq, D] over [B, N, D]; mask [B, N], True = keep
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return out.transpose(1, 2).flatten(2)

    def forward(self, queries, video, text=None, text_mask=None):
        q, v = self.to_q(self.norm_q(queries)), self.norm_v(video)
        if not self.gated:
            return queries + self.out(self.attend(q, self.k_v(v), self.v_v(v)))
        t = self.norm_t(text)
        h = self.attend(q, self.k_v(v), self.gate_v(v) * self.v_v(v))
        return queries + self.out(h + self.attend(q, self.k_t(t), self.gate_t(t) * self.v_t(t), text_mask))


class DiNaHead(nn.Module):
    """Tap features of one or more noise levels -> scalar reward (official RewardHead, Wan port)."""
    def __init__(self, dim: int, num_taps: int = 3, num_queries: int = 4, heads: int = 8, adapter: str = "reward"):
        super().__init__()
        self.adapter, w = adapter, dim // 4  # the peft adapter (on the generator's blocks) that this head reads
        self.film_video = nn.ModuleList(FiLMTap(dim, dim, w) for _ in range(num_taps))
        self.film_text = FiLMTap(dim, dim, w)  # Wan: one text tap (no text stream through the blocks)
        self.fuse_video, self.fuse_text = nn.Linear(num_taps * w, dim), nn.Linear(w, dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.attn1, self.attn2 = QueryAttention(dim, heads, gated=True), QueryAttention(dim, heads, gated=False)
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
        video, text = (torch.cat(t, 1) for t in zip(*(self.tokens(f) for f in feats_per_level)))
        q = self.attn1(self.queries.expand(len(video), -1, -1), video, text, text_mask.repeat(1, len(feats_per_level)))
        q = self.attn2(q, video)  # attn1: video + gated text; attn2: video only
        q = q + self.ffn(self.ffn_norm(q))
        return self.to_reward(q).squeeze(-1).mean(1)  # per-query scalar, averaged over queries


# ==== Adapters: the reward model and the policy share the generator's base weights
def set_active_adapter(transformer, name: str):
    """set_adapter(name), keeping every requires_grad: peft's trains the active adapter and freezes the others."""
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.set_adapter(name)
    for p, f in flags:
        p.requires_grad_(f)


def dina_reward(transformer, head, x0, embeds, text_mask, sigmas, eps, taps):
    """r(x_sigma, sigma, c) with the reward adapter; several sigmas (floats or [B]) = noise ensembling (one eps)."""
    set_active_adapter(transformer, head.adapter)
    feats = []
    for s in sigmas:  # x_sigma = (1 - sigma) x0 + sigma eps; the transformer's timestep is 1000 sigma
        t = 1000 * torch.as_tensor(s, dtype=torch.float32, device=x0.device)
        feats.append(common.dit_prefix_features(transformer, common.add_noise(x0, eps, s), t, embeds, taps=tuple(taps)))
    return head(feats, text_mask)


def add_lora(transformer, rank: int, alpha: float, name: str, args: Args, blocks=None):
    """common.add_lora (B = 0); --lora-init gaussian: A ~ N(0, 1/r), peft's "gaussian" (official, both adapters)."""
    params = common.add_lora(transformer, rank, alpha, adapter_name=name, blocks=blocks)
    for p in (p for n, p in transformer.named_parameters() if args.lora_init == "gaussian" and f".lora_A.{name}." in n):
        nn.init.normal_(p, std=1 / rank)
    return params


def add_reward_model(pipe, args: Args, name: str = "reward", path=None):
    """Reward LoRA on the kept blocks + a new head, or those of a reward_model.safetensors -> (head, LoRA params)."""
    tr = pipe.transformer
    params = add_lora(tr, args.rm_lora_rank, args.rm_lora_alpha, name, args, list(range(args.rm_blocks)))
    head = DiNaHead(tr.config.num_attention_heads * tr.config.attention_head_dim, len(args.taps), args.num_queries,
                    args.num_heads, name).to(tr.device)
    if path:
        from peft.utils import set_peft_model_state_dict
        sd = load_file(str(path))
        try:
            head.load_state_dict({k[5:]: v for k, v in sd.items() if k[:5] == "head."})
        except RuntimeError as e:  # a head of another layout (a file of an older dina_lrm.py)
            raise UserError(f"{path}: head tensors of another layout ({str(e).splitlines()[1].strip()})") from None
        set_peft_model_state_dict(tr, {k[5:]: v for k, v in sd.items() if k[:5] == "lora."}, adapter_name=name)
    return head, params


def train_only(transformer, name: str, heads=()) -> list:
    """Only adapter `name`'s LoRA and the heads of `name` train (all built before FSDP2 shards) -> those parameters."""
    [getattr(m, "reshard", lambda: None)() for m in (*transformer.modules(), *heads)]  # FSDP2: back to shards first
    transformer.requires_grad_(False), [h.requires_grad_(h.adapter == name) for h in heads]
    return [p.requires_grad_(True) for n, p in transformer.named_parameters() if f".{name}." in n and "lora_" in n]


def optimiser_step(opt, params, micro_step, grad_accum: int, grad_clip: float, where: str):
    """grad_accum micro_step()s (each loss / grad_accum: the mean's gradient), clip, step -> (mean loss, extras)."""
    opt.zero_grad(set_to_none=True)
    out = []
    for _ in range(grad_accum):
        loss, extra = micro_step()
        losses = common.gather(loss.detach()[None])  # every rank's: all stop together, the global mean is logged
        common.require(torch.isfinite(losses).all(), f"{where}: loss is {str(losses.tolist())[1:-1]} (lower the lr)")
        (loss / grad_accum).backward()
        out.append((losses.mean(), extra))
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return torch.stack([loss for loss, _ in out]).mean().item(), [extra for _, extra in out]


def stage_steps(run, stage: str, total: int, args: Args, **state):
    """rundir's steps of a stage; once one trains here, later stages' checkpoints are stale (e.g. --max-steps): gone."""
    if getattr(run, "stale", False):
        run.checkpoint_path(stage).unlink(missing_ok=True)
    for step in run.steps(stage, total, every=args.checkpoint_every, stop_at=args.max_steps, **state):
        run.stale = True
        yield step


# ==== Stage 1: train the reward model on preference pairs
def rm_step(transformer, head, win, lose, embeds, mask, target, args: Args, g: torch.Generator):
    """Stage 1's loss: sigma ~ U(0, 1) (paper), one sigma and eps per pair (official), one pass -> (loss, r_w, r_l)."""
    n = len(win) * common.rank_world()[1]  # torchrun: win/lose are this rank's; sigma, eps drawn for the global batch
    sigma = common.local_batch(common.sample_train_sigma(n, 1.0, generator=g, device=win.device))
    eps = common.local_batch(torch.randn((n, *win.shape[1:]), generator=g)).to(win.device)
    two = lambda t: torch.cat([t, t])
    r_win, r_lose = dina_reward(transformer, head, torch.cat([win, lose]), two(embeds), two(mask), [two(sigma)],
                                two(eps), args.taps).chunk(2)
    return preference_loss(r_win, r_lose, sigma, target, args).mean(), r_win, r_lose


def reward_model_stage(pipe, heads: dict, data, train_idx, test_idx, args: Args, run, summary: dict):
    """Stage 1: each head of `heads` (reward, --ablation; by adapter) by rm_step at constant lr (official), a run stage;
    held-out accuracy per scoring into `summary` and a .png; reward_model.safetensors (+ shape args) -> table rows."""
    tr, dev, rows, curves, keys = pipe.transformer, pipe.transformer.device, [], {}, PAIR_KEYS

    def chosen_first(b):  # pairs ordered (preferred, other) with the target y: 1 for strict pairs, 1/2 for ties
        pref, a, o, p = b["pref"], b["latents_a"], b["latents_b"], b["prompt_idx"]
        swap = (pref == 1).view(-1, 1, 1, 1, 1)
        return tuple(t.to(dev) for t in (torch.where(swap, o, a), torch.where(swap, a, o), data["prompt_embeds"][p],
                                         data["prompt_mask"][p], torch.where(pref == 2, .5, 1)))

    def micro_step():  # this rank's share of the step's pairs (dataset.batches: a function of seed and step)
        win, lose, emb, mask, target = chosen_first(next(loader))
        loss, r_win, r_lose = rm_step(tr, head, win, lose, emb, mask, target, margs, g)
        return loss, common.gather(torch.stack([(r_win > r_lose).float(), target], 1))  # train accuracy: strict pairs

    @torch.no_grad()
    def accuracy(sigmas, batch=64):  # held-out strict pairs, one eps per item (official eval), the same for all
        g, test, correct = torch.Generator().manual_seed(1234), test_idx[data["pref"][test_idx] < 2], []
        for i in range(0, len(test), batch):  # a chunk: padded to split over the ranks, results gathered, cut back
            n, pad = len(test[i:i + batch]), -len(test[i:i + batch]) % common.rank_world()[1]
            eps = torch.randn((2, n, *data["latents_a"].shape[1:]), generator=g)
            mine = common.local_batch(torch.cat([torch.arange(n), torch.full((pad,), n - 1)]))
            win, lose, emb, mask, _ = chosen_first({k: data[k][test[i:i + batch][mine]] for k in keys})
            r_win, r_lose = dina_reward(tr, head, torch.cat([win, lose]), torch.cat([emb, emb]),
                                        torch.cat([mask, mask]), sigmas, eps[:, mine].flatten(0, 1).to(dev), args.taps
                                        ).float().chunk(2)
            correct.append(common.gather((r_win > r_lose).float()).cpu()[:n])
        return rundir.mean_se(torch.cat(correct))
    train = train_idx[data["pref"][train_idx] < 2] if args.ties == "drop" else train_idx
    for name, head in heads.items():
        loss = args.loss if name == "reward" else "thurstone-constant"
        margs, timer = dataclasses.replace(args, loss=loss), rundir.StepTimer(dev)
        params = train_only(tr, name, list(heads.values())) + list(head.parameters())
        g, stage = torch.Generator().manual_seed(args.seed), f"rm-{name}"  # g: sigmas and eps
        # foreach: a CPU's default AdamW loops over the tensors; the same numbers, ~2x faster
        opt, loader = torch.optim.AdamW(params, lr=args.rm_lr, weight_decay=args.rm_weight_decay, foreach=True), None
        for step in stage_steps(run, stage, args.rm_steps, args, modules=dict(head=head, lora=tr), optimizer=opt,
                                generators=dict(data=g)):
            if loader is None:  # the first step: a resumed stage's, or 0 (a stale checkpoint is gone by then)
                loader = dataset.batches(data, keys, args.rm_batch, args.seed, step * args.rm_grad_accum, rows=train)
            with timer:
                loss_value, hits = optimiser_step(opt, params, micro_step, args.rm_grad_accum, args.grad_clip,
                                                  f"stage 1 step {step} (--rm-lr {args.rm_lr})")
            hits = torch.cat(hits)
            run.log(step, stage, loss=loss_value, train_acc=hits[hits[:, 1] == 1, 0].mean().item())
        del loader
        rundir.plot_metrics(run, stage, ["loss", "train_acc"], f"reward model '{name}' ({loss})")
        for sig in [[s] for s in args.eval_sigmas] + [args.ensemble_sigmas]:
            acc, se = accuracy(sig)
            key = "ensemble" if len(sig) > 1 else f"sigma_{sig[0]}"
            rows.append(dict(model=f"{name} ({loss})", scoring=key.replace("_", " ") + f" {sig}" * (len(sig) > 1),
                             accuracy=acc, se=se))
            summary[f"acc_{key}" if name == "reward" else f"{name}_acc_{key}"] = acc
        accs = [r["accuracy"] for r in rows[-len(args.eval_sigmas) - 1:]]
        curves[f"{name} ({loss}); ensemble {args.ensemble_sigmas}: {accs[-1]:.3f}"] = (args.eval_sigmas, accs[:-1])
        summary[f"{name}_rm_seconds_per_step"] = timer.seconds_per_step
        if name == "reward":  # the ablation is only measured (its adapter stays, inactive: FSDP2 holds it)
            sd = {f"head.{k}": v for k, v in head.state_dict().items()}
            sd.update({f"lora.{k}": v for k, v in common.lora_state_dict(tr, name).items()})
            meta = {k: getattr(args, k) for k in (*SHAPE_KEYS, "loss", "backbone")}  # checked on --reward-ckpt
            common.save_safetensors(sd, run.dir / "reward_model.safetensors", meta)
    set_active_adapter(tr, "reward")
    rundir.plot(run.dir / "accuracy_vs_sigma.png", curves, "held-out accuracy on strict pairs", "sigma", "accuracy")
    return rows


# ==== Stage 2: ReFL with the learned reward (flow-grpo-rm train_sd3_refl_rm.py)
def checkpoint_with_adapter(transformer, set_adapter):
    """Block checkpointing that recomputes each block under its forward's adapter (diffusers': the active one)."""
    @contextlib.contextmanager
    def under(name):  # a block's recompute: under the adapter of its forward, then back
        before = transformer.active_adapters()[0]
        set_adapter(transformer, name)
        yield
        set_adapter(transformer, before)
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=lambda block, *a: checkpoint(  # at forward:
        block.__call__, *a, use_reentrant=False,  # context_fn's default reads the adapter active now
        context_fn=lambda name=transformer.active_adapters()[0]: (contextlib.nullcontext(), under(name))))


def add_policy(pipe, head, args: Args):
    """Stage 2's trainables: a policy LoRA on every block (main adds it before sharding); the reward model frozen."""
    if "policy" not in pipe.transformer.peft_config:
        add_lora(pipe.transformer, args.policy_rank, args.policy_alpha, "policy", args)
    policy = train_only(pipe.transformer, "policy", [head])
    if args.gradient_checkpointing:  # one backward spans policy- and reward-adapter forwards
        checkpoint_with_adapter(pipe.transformer, set_active_adapter)
    return policy


def refl_loss(r, offset: float = 12.0, scale: float = 10.0):
    """Official ReFL objective: R = (r + offset) / scale (its RL reward function), minimise mean(2 - R)."""
    return (2 - (r + offset) / scale).mean()


def refl_step(pipe, head, embeds, mask, args: Args, gen: torch.Generator, negative=None):
    """No-grad rollout to a random late step, one step with grad, x0-hat re-noised at sigma 0.4 -> (loss, r, step)."""
    tr, dev = pipe.transformer, pipe.transformer.device
    sigmas = common.sigma_schedule(args.num_steps, common.backbone_geometry(pipe)["flow_shift"])  # the checkpoint's
    late = min(int(round(args.late_fraction * args.num_steps)), args.num_steps - 1)  # official: 40 steps -> 30..39
    mid = int(torch.randint(late, args.num_steps, (1,), generator=gen))
    shape = (len(embeds) * common.rank_world()[1], *common.backbone_geometry(pipe)["latent_shape"])  # global batch
    noise = common.local_batch(torch.randn(shape, generator=gen)).to(dev)
    set_active_adapter(tr, "policy")
    with torch.no_grad():
        x, _ = common.rollout(tr, noise, embeds, sigmas, 0, mid, guidance_scale=args.guidance_scale,
                              negative_embeds=negative)
    v = common.predict_velocity(tr, x, sigmas[mid], embeds)  # the one step with gradient, no CFG (official)
    x0_hat = common.x0_from_velocity(x, v, sigmas[mid])
    eps = common.local_batch(torch.randn(shape, generator=gen)).to(dev)  # fresh noise for the reward's sigma = 0.4
    r = dina_reward(tr, head, x0_hat, embeds, mask, [args.score_sigma], eps, args.taps)
    set_active_adapter(tr, "policy")
    return refl_loss(r), r.detach(), mid


def run_refl(pipe, head, data, args: Args, run, prompts, summary: dict):
    """Stage 2: ReFL of a policy LoRA; its EMA (--ema) or last weights scored before/after, paired by seed -> rows."""
    tr, dev = pipe.transformer, pipe.transformer.device
    eval_prompts, eval_embeds, eval_mask, train_rows, negative = prompts
    rows = [j * len(eval_embeds) // args.eval_samples for j in range(args.eval_samples)]  # consecutive blocks

    @torch.no_grad()
    def evaluate():  # fresh samples from fixed seeds with the policy: DiNa score, true toy reward (toy prompts)
        set_active_adapter(tr, "policy")  # each rank samples its share of (row, seed); the scores are gathered
        mine = common.local_batch(torch.arange(len(rows)))
        at = [rows[j] for j in mine]
        z = common.sample_latents(pipe, eval_embeds[at], (10_000 + mine).tolist(), args.num_steps, desc="evaluation "
                                  "samples" * common.is_main() or None, guidance_scale=args.guidance_scale,
                                  negative_embeds=negative)
        eps = torch.randn((len(rows), *z.shape[1:]), generator=torch.Generator().manual_seed(4321))[mine].to(dev)
        scores = {"true_reward": toy.true_reward(pipe, z, [eval_prompts[j] for j in at])} if eval_prompts else {}
        scores["dina_reward"] = dina_reward(tr, head, z.to(dev), eval_embeds[at].to(dev), eval_mask[at].to(dev),
                                            [args.score_sigma], eps, args.taps)
        return z, {k: common.gather(v.float().to(dev)).cpu() for k, v in scores.items()}

    def micro_step():  # the step's prompts (dataset.batches over the training prompts: a function of seed and step)
        b = next(loader)
        loss, r, mid = refl_step(pipe, head, b["prompt_embeds"].to(dev), b["prompt_mask"].to(dev), args, gen,
                                 None if negative is None else negative.expand(len(b["rows"]), -1, -1))
        return loss, (common.gather(r), mid)
    policy = add_policy(pipe, head, args)
    z_before, before = evaluate()
    opt = torch.optim.AdamW(policy, lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    gen, timer, loader = torch.Generator().manual_seed(args.seed + 1), rundir.StepTimer(dev), None  # loader: as stage 1
    ema = [p.detach().clone() for p in policy] if args.ema else []  # the policy's EMA, in the stage's checkpoints
    for step in stage_steps(run, "refl", args.tune_steps, args, modules=dict(policy=tr), optimizer=opt,
                            generators=dict(refl=gen), tensors={f"ema{i}": e for i, e in enumerate(ema)}):
        if loader is None:
            loader = dataset.batches(data, ["prompt_embeds", "prompt_mask"], args.batch_size, args.seed + 1,
                                     step * args.grad_accum, rows=train_rows)
        with timer:
            loss, out = optimiser_step(opt, policy, micro_step, args.grad_accum, args.grad_clip,
                                       f"ReFL step {step} (--lr {args.lr})")
        if ema and (step + 1) % 8 == 0:  # official: decay 0.9, every 8 steps, after flow_grpo's warm-up
            for e, p in zip(ema, policy):
                e.lerp_(p.detach(), 1 - min((step + 2) / (step + 11), 0.9))
        run.log(step, "refl", loss=loss, reward=torch.cat([o[0] for o in out]).mean().item(),
                mid_step=[o[1] for o in out])
    rundir.plot_metrics(run, "refl", ["loss", "reward"], "ReFL: loss 2 - (r + 12) / 10, DiNa reward r")
    [p.data.copy_(e) for p, e in zip(policy, ema)]  # --ema: the EMA is evaluated and saved (checkpoint: the weights)
    z_after, after = evaluate()
    common.save_lora(tr, run.dir / "policy_lora", "policy")
    for tag, z in (("before", z_before), ("after", z_after)):
        for i in range(min(args.save_videos, len(z))):
            rundir.export_video(common.decode_latents(pipe, z[i:i + 1].to(dev))[0], run.dir / f"videos/{tag}_{i}.mp4")
    paired, table = rundir.paired_summary(before, after)
    summary.update(paired, tune_steps=min(args.tune_steps, args.max_steps or args.tune_steps), eval_samples=len(rows),
                   tune_seconds_per_step=timer.seconds_per_step)
    return table


def estimate_memory(args: Args) -> dict:
    """--estimate-memory: rm_step (a pair) and refl_step (batch 1, the no-grad rollout counted) on fake tensors."""
    def build(refl: bool):  # as main and run_refl set them up
        pipe = est.pipeline(gradient_checkpointing=args.gradient_checkpointing)
        head = add_reward_model(pipe, args)[0]
        return pipe, head, refl and add_policy(pipe, head, args)
    size = dict(height=args.height, width=args.width, num_frames=args.num_frames)
    check_inputs(args, common.backbone_config(args.backbone), size)  # the size, --rm-blocks, --num-heads
    with estimate.StageEstimates("DiNa-LRM", args.backbone, **size) as est:
        est.load_phase()
        (x0, emb, mask), (pipe, head, _) = est.inputs(), est.build(lambda: build(False))
        est.step("reward-model step (pair)", lambda *a: rm_step(*a, args, torch.Generator())[0].backward(),
                 pipe.transformer, head, x0, x0, emb, mask, torch.ones(1))
        pipe, head, _ = est.build(lambda: build(True))
        short = dataclasses.replace(args, num_steps=1, late_fraction=0.0)  # mid = 0: no no-grad rollout
        est.step("ReFL step", lambda *a: refl_step(*a, short, torch.Generator())[0].backward(), pipe, head, emb, mask,
                 rollout_forwards=(min(round(args.late_fraction * args.num_steps), args.num_steps - 1) + args.num_steps
                                   - 1) / 2 * (1 + (args.guidance_scale > 1)))  # E[mid] forwards, x2 with CFG
    return est.results


# ==== Input checks (issue #19): a user's mistake fails here, before any model loads or a run folder exists
def read_pairs(args: Args):
    """--data: dataset.load (files, keys, rows, NaN/inf, prompt indices), 'pref' in {0, 1, 2}, dataset.drop_repeats."""
    data, meta = dataset.load(args.data, "pairs", lazy=True)  # latents stay on disk (dataset.Rows)
    pref = data["pref"]
    bad = ((pref != 0) & (pref != 1) & (pref != 2)).nonzero()[:5, 0].tolist()
    common.require(not bad, f"{args.data}: 'pref' must be 0 (A), 1 (B) or 2 (tie); rows {bad}: {pref[bad].tolist()}")
    return dataset.drop_repeats(dict(data, pref=pref.long()), "pairs", args.on_duplicates, args.data), meta


def check_reward_ckpt(args: Args):
    """--reward-ckpt: a reward model (its header) made with this run's shape flags (all that differ named) -> width."""
    path = args.reward_ckpt
    common.require(Path(path).is_file(), f"--reward-ckpt {path}: no such file (write one with --stage rm)")
    try:
        with safe_open(path, "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            width = f.get_slice("head.queries").get_shape()[-1] if "head.queries" in keys else None
    except (SafetensorError, OSError) as e:
        raise UserError(f"--reward-ckpt {path}: not a safetensors file ({e})") from None
    common.require(all(k in meta for k in SHAPE_KEYS) and width and any(k.startswith("lora.") for k in keys),
                   f"--reward-ckpt {path}: not a DiNa-LRM reward model (no head, LoRA or shape metadata)")
    differ = [f"--{k.replace('_', '-')} {meta[k]}, this run has {getattr(args, k)}" for k in SHAPE_KEYS
              if meta[k] != str(getattr(args, k))]
    common.require(not differ, f"{path}: trained with {'; '.join(differ)} (pass the checkpoint's values)")
    return width


def check_inputs(args: Args, cfg: dict, size: dict, data=None, meta=None, width=None, where=""):
    """Flags, data, a --reward-ckpt's width and the split against the backbone's config -> (geometry, split or None)."""
    geo, tr = common.geometry(cfg, **size), cfg["transformer"]
    dim, layers = tr["num_attention_heads"] * tr["attention_head_dim"], tr["num_layers"]
    common.require(max(args.taps) <= args.rm_blocks, f"--taps {args.taps}: past --rm-blocks {args.rm_blocks}", 2)
    common.require(args.rm_blocks <= layers, f"--rm-blocks {args.rm_blocks}: the backbone has {layers}", 2)
    common.require(dim % args.num_heads == 0, f"--num-heads {args.num_heads}: must divide the backbone width {dim}", 2)
    common.require(width in (None, dim), f"--reward-ckpt {args.reward_ckpt}: a head of width {width}, made for another "
                   f"backbone (this one: {dim})")
    if data is None:
        return geo, None
    dataset.check_latents(data, geo, where)
    train, test = dataset.split_indices(len(data["pref"]), args.test_fraction, args.seed)
    strict = [int((data["pref"][idx] < 2).sum()) for idx in (train, test)]
    common.require(args.reward_ckpt or len(train) and (strict[0] or args.ties == "half"), f"{where}: no strict pair "
                   f"(0 or 1) among the {len(train)} training pairs (a tie teaches no order; lower --test-fraction)")
    common.require(args.reward_ckpt or strict[1], f"{where}: no strict pair among the {len(test)} held-out pairs "
                   f"(raise --test-fraction)")
    common.require(args.stage == "rm" or str(meta.get("source")).startswith("toy") or len(data["prompt_embeds"]) > 1,
                   f"{where}: ReFL needs 2 prompts or more (a tenth is held out)")
    return geo, (train, test)


def main(args: Args) -> dict:
    common.require(args.stage != "tune" or args.reward_ckpt, "--stage tune needs --reward-ckpt (--stage rm)", 2)
    common.require(args.device in ("auto", "cpu") or args.device.startswith("cuda") and torch.cuda.is_available(),
                   f"--device {args.device}: auto, cpu or (with a GPU here) cuda[:n]", 2)
    common.require(args.data or args.estimate_memory or args.backbone == "tiny",
                   f"--backbone {args.backbone}: the toy world is tiny's; pass --data (from prepare.py)", 2)
    if args.estimate_memory:
        return estimate_memory(args)
    data, meta = read_pairs(args) if args.data else (None, {})
    size = dataset.video_size(meta, args.data, args.height, args.width, args.num_frames)  # typed, else the data's
    width = check_reward_ckpt(args) if args.reward_ckpt else None
    if not (args.backbone.count("/") == 1 and not Path(args.backbone).expanduser().exists()):  # not a hub id
        check_inputs(args, common.backbone_config(args.backbone), size, data, meta, width, args.data)  # no weights
    rundir.check_writable(args.out_dir or "runs")
    rundir.seed_everything(args.seed)
    dev = rundir.pick_device(args.device)
    memory = rundir.StepTimer(dev)  # resets the CUDA peak-memory counter
    pipe = common.load_backbone(args.backbone, dev, common.pick_dtype(args.dtype, dev), **size)
    if data is None:  # the toy world, made by the plain tiny generator (before any adapter)
        data, meta = toy.toy_dataset(pipe, "pairs", args.toy_size, seed=args.seed, cache_dir=args.toy_cache)
    where = args.data or f"{args.toy_cache} (toy pairs)"
    geo, (train_idx, test_idx) = check_inputs(args, pipe.wan_config, size, data, meta, width, where)  # hub id, toy
    args = dataclasses.replace(args, **{k: geo[k] for k in ("height", "width", "num_frames")})  # args.json: the size
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    w = common.rank_world()[1]  # torchrun: each rank takes 1/w of every batch
    common.require(not (args.rm_batch % w or args.batch_size % w or args.eval_samples % w), "--rm-batch, --batch-size "
                   f"and --eval-samples must be multiples of the {w} processes", 2)
    heads, rows = {n: add_reward_model(pipe, args, n, args.reward_ckpt)[0] for n in ["reward"] + ["ablation"] * (
        args.ablation and not args.reward_ckpt)}, []
    if args.stage != "rm":
        add_lora(pipe.transformer, args.policy_rank, args.policy_alpha, "policy", args)
    common.shard(pipe.transformer, *heads.values())  # FSDP2 (torchrun): after every adapter and head, seeded alike
    run = rundir.Run("dina_lrm", args, args.out_dir or None, args.resume)  # only now: a failed start leaves none
    summary = dict(backbone=args.backbone, pairs=len(data["pref"]),
                   test_strict_pairs=int((data["pref"][test_idx] < 2).sum()), run_dir=str(run.dir))
    prompts, embeds = None, data["prompt_embeds"]  # ReFL's held-out prompts and CFG negative, encoded before T5 goes
    if args.stage != "rm":
        encode = lambda p: common.encode_prompts(pipe, p, max_sequence_length=embeds.shape[1])
        if str(meta.get("source", "")).startswith("toy"):  # held-out toy prompts (shape word 'patch'), never in ReFL
            prompts = (toy.toy_prompts("eval"), *encode(toy.toy_prompts("eval")), torch.arange(len(embeds)))
        else:  # a real prompt table: hold out its last 10% (no ground-truth reward: report the DiNa score)
            k = max(1, len(embeds) // 10)
            prompts = (None, embeds[-k:], data["prompt_mask"][-k:], torch.arange(len(embeds) - k))
        prompts += (encode([""])[0].to(pipe.transformer.device) if args.guidance_scale > 1 else None,)
    common.drop_text_encoder(pipe)  # every prompt is encoded: UMT5-XXL leaves before training
    if not args.reward_ckpt:
        rows = reward_model_stage(pipe, heads, data, train_idx, test_idx, args, run, summary)
        print(rundir.format_table(rows, ["model", "scoring", "accuracy", "se"]))
    if args.stage != "rm":
        print(rundir.format_table(run_refl(pipe, heads["reward"], data, args, run, prompts, summary)))
        summary["claims"] = [dict(claim="true-reward gain of the ReFL policy LoRA over the base, held-out toy prompts "
                                  "paired by seed", mean=g[0], se=g[1]) for g in [summary.get("true_reward_gain")] if g]
    summary.update(peak_memory_gib=memory.peak_memory_gib(), accuracy_table=rows)
    run.summary(summary)
    print(f"summary: {run.dir / 'summary.json'} (plots: {', '.join(p.name for p in sorted(run.dir.glob('*.png')))})"
          + "; reward_model.safetensors" * (not args.reward_ckpt) + "; policy_lora/" * (args.stage != "rm"))
    return summary


if __name__ == "__main__":
    rundir.cli(main, Args, TINY)
