"""PRFL: "Video Generation Models Are Good Latent Reward Models" (Mi et al., arXiv 2511.21541).

Two stages, both in the generator's noisy latent space; nothing in training decodes with the VAE.
1. PAVRM (process-aware video reward model): a copy of the generator's first 8 DiT blocks reads a noisy
   latent x_t at any t; one learnable query attends over all tokens (z = attention + query) and an MLP
   D->1024->512->1 gives a logit s, reward r = sigmoid(s). BCE on noisy latents of labelled videos.
2. PRFL (process reward feedback learning): roll the generator out from noise without gradient to a random
   step m, take ONE step with gradient, score the still-noisy x_{m+1} with the frozen PAVRM at t_{m+1},
   minimise lambda * relu(2 - r); every iteration also a flow-matching SFT step on real latents.

Equation -> code
    Eq. (4)   features after block 8 of a copy of the DiT         PAVRM.features (common.dit_prefix_features)
    Eq. (5)   query-based spatio-temporal aggregation (+ query)    QueryAttention
    Eq. (6)   BCE on noisy latents x_t                             bce_loss  (Tab. 7's BT: bradley_terry_loss)
    Alg. 1 / Eqs. (7)-(8)  rollout to m, one step with gradient    process_reward (common.rollout, grad_steps=[m])
    Eq. (9)   L_PRFL = lambda * relu(2 - r)                        prfl_loss
    Eq. (10)  L_SFT, flow matching on real latents                 sft_loss
    one training step of each stage (loop and --estimate-memory)  pavrm_step, prfl_step
    Tab. 5    accuracy per noise interval (+ AUC, not in the paper) evaluate_pavrm, auc
    Tab. 3    early / middle / late / full range of m              sample_cutoff (--m-range)

As the official code (Tencent-Hunyuan/HY-Video-PRFL) where it and the paper differ; where this script differs from both:
docs/prfl.md. Run folder, checkpoints, --resume: rundir; torchrun (FSDP2), data left on disk: common.py, dataset.py. On
--backbone tiny, TINY (below) replaces the paper's rates and lengths: at lr 1e-6 a 40k-parameter model does not move.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import common
import dataset
import estimate
import rundir
import toy
from common import UserError, arg

TAB5_EDGES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # Tab. 5's noise intervals [0,.2], (.2,.4], ..., (.8,1]
SIZE = ("height", "width", "num_frames")


@dataclasses.dataclass
class Args:
    # generic
    stage: str = arg("all", "rm: train PAVRM; tune: PRFL (needs a PAVRM); all: both", choices=["rm", "tune", "all"])
    out_dir: str = arg("", "run folder (default: a new runs/prfl-<backbone>-<time>); an existing one needs --resume")
    resume: bool = arg(False, "continue the run in --out-dir from its checkpoints (the same arguments)")
    checkpoint_every: int = arg(100, "save a checkpoint of the stage every N optimiser steps (and at its end)", min=1)
    seed: int = arg(0, "seed of training randomness (evaluation uses its own fixed seeds)")
    device: str = arg("auto", "auto | cpu | cuda")
    dtype: str = arg(None, "DiT dtype (default: bf16 on CUDA, fp32 on CPU)", type=str, choices=["bf16", "fp32"])
    data: str = arg("", "binary latent dataset folder (prepare.py); empty = the toy world (tiny only)")
    sft_data: str = arg("", "latent dataset folder of real videos for L_SFT; empty = rows of --data labelled 1")
    on_duplicates: str = arg("fail", "repeated or contradicting rows in the data", choices=["fail", "drop"])
    height: int = arg(None, "video height of all sampling (default: --data's, else the backbone's)", type=int, min=1)
    width: int = arg(None, "video width (default: --data's, else the backbone's)", type=int, min=1)
    num_frames: int = arg(None, "video frames, 4k+1 (default: --data's, else the backbone's)", type=int, min=1)
    max_steps: int = arg(None, "cap on the optimiser steps of every stage (smoke runs; default: none)", type=int, min=1)
    toy_size: int = arg(1024, "toy world: number of labelled latents", min=16)
    toy_cache: str = arg("runs/toy_data", "toy world: dataset cache folder")
    test_fraction: float = arg(0.2, "held-out share of --data for PAVRM accuracy", min=0, max=1)
    estimate_memory: bool = arg(False, "only print peak GPU memory and TFLOPs of each stage (no weights, no data)")
    backbone: str = arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a diffusers Wan folder")
    gradient_checkpointing: bool = arg(True, "block checkpointing in generator and PAVRM")
    # reward model (PAVRM)
    reward_ckpt: str = arg("", "PAVRM safetensors to reuse (no PAVRM training); --rm-* must match its metadata")
    rm_blocks: int = arg(8, "DiT blocks copied into PAVRM; features after the last one (Eq. 4, Tab. 8)", min=1)
    rm_heads: int = arg(8, "heads of the query attention (Eq. 5; official 8)", min=1)
    rm_pooling: str = arg("query", "query: Eq. 5; attn: no residual (Tab. 5)", choices=["query", "attn", "mean", "max"])
    rm_loss: str = arg("bce", "Eq. 6, or Bradley-Terry on (good, bad) pairs (Tab. 7)", choices=["bce", "bt"])
    rm_sigma_shift: float = arg(5.0, "training sigma = shift(s), s uniform: 5 = official, 1 = paper's U(0,1)", gt=0)
    rm_sigma_range: list = arg(None, "sigma = lo + (hi - lo) shift(s) (ours)", factory=lambda: [0.0, 1.0], min=0, max=1)
    rm_lr_blocks: float = arg(1e-6, "AdamW lr of the 8 DiT blocks (paper)", gt=0)
    rm_lr_head: float = arg(1e-5, "AdamW lr of query attention + MLP (paper; code 1e-6)", gt=0)
    rm_weight_decay: float = arg(0.01, "AdamW weight decay", min=0)
    rm_batch: int = arg(2, "PAVRM batch (official: 1 per 4-GPU sequence-parallel group)", min=1)
    rm_steps: int = arg(3000, "PAVRM steps (the paper gives none)", min=1)
    # fine-tuning (PRFL)
    full_finetune: bool = arg(False, "train every generator weight (official) at --full-finetune-lr, not a LoRA")
    full_finetune_lr: float = arg(5e-6, "AdamW lr of --full-finetune, constant (paper)", gt=0)
    lora_rank: int = arg(128, "LoRA rank on q/k/v/o, alpha = rank (the official optional LoRA)", min=1)
    lr: float = arg(1e-4, "AdamW lr of the LoRA, constant (ours; the paper's 5e-6 is --full-finetune-lr)", gt=0)
    weight_decay: float = arg(0.01, "AdamW weight decay", min=0)
    grad_clip: float = arg(1.0, "gradient-norm clip", gt=0)
    tune_steps: int = arg(1000, "optimiser steps (paper: 1 epoch of ~30k pairs at batch 30)", min=1)
    batch_size: int = arg(1, "per-step batch of the fine-tuning (official per GPU)", min=1)
    grad_accum: int = arg(5, "gradient accumulation (official)", min=1)
    num_steps: int = arg(40, "sampler steps N, training rollout and evaluation (paper)", min=2)
    flow_shift: float = arg(5.0, "shift of the rollout / evaluation schedule (official; not the checkpoint's)", gt=0)
    m_range: str = arg("full", "cut-off step m: all, or a third (Tab. 3)", choices=["full", "early", "middle", "late"])
    reward_weight: float = arg(0.1, "lambda of Eq. 9 (official code)", min=0)
    reward_target: float = arg(2.0, "L_PRFL = lambda * relu(target - r) (official code)")
    sft_weight: float = arg(1.0, "weight of L_SFT (Eq. 10); 0 turns the SFT step off", min=0)
    sft_sigma_shift: float = arg(5.0, "L_SFT sigma = shift(s), s uniform (official code)", gt=0)
    null_prompt_prob: float = arg(0.1, "probability of the empty prompt in a training batch (official)", min=0, max=1)
    # evaluation
    eval_prompts: list = arg(None, "held-out prompts (default: the toy world's; --data: its first 16)", factory=list)
    eval_samples: int = arg(16, "fresh samples before/after PRFL, prompts cycled, fixed seeds", min=1)
    guidance_scale: float = arg(5.0, "evaluation CFG, the empty prompt as negative (README of the code)", min=0)
    save_videos: int = arg(4, "before/after mp4s saved under <run>/videos/ (the first eval samples)", min=0)
    eval_sigma_edges: list = arg(None, "sigma edges of Tab. 5's accuracy", factory=lambda: list(TAB5_EDGES), min=0, max=1)


# The parser's defaults on --backbone tiny (rundir.parse_args; a typed value always wins), CPU-sized; real backbones keep
# Args. rm_sigma_shift 1: the toy latents carry little above sigma 0.8, where shift 5 spends most steps (docs/prfl.md).
TINY = dict(rm_lr_blocks=1e-4, rm_lr_head=1e-3, rm_batch=32, rm_steps=600, lora_rank=16, lr=2e-3,
            full_finetune_lr=1e-3, tune_steps=100, batch_size=16, grad_accum=1, num_steps=10, guidance_scale=1.0,
            eval_samples=384, gradient_checkpointing=False, checkpoint_every=50, rm_sigma_shift=1.0)


# ==== PAVRM: Eqs. (4)-(6)
class QueryAttention(nn.Module):
    """Eq. (5): one learnable query attends over all N tokens; z = attention + query (residual optional)."""

    def __init__(self, dim: int, heads: int = 8, residual: bool = True):
        super().__init__()
        self.query = nn.Parameter(torch.empty(1, dim))
        nn.init.xavier_uniform_(self.query)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.residual = residual

    def forward(self, h):  # [B, N, D] -> [B, D]
        q = self.query.to(h.dtype).expand(len(h), 1, -1)
        z = self.attn(q, h, h, need_weights=False)[0].squeeze(1)
        # the raw query is a content-agnostic prior; squeeze BEFORE adding, so [B,D] + [1,D] stays [B,D]
        return z + self.query.to(z.dtype) if self.residual else z


class PAVRM(nn.Module):
    """Process-aware video reward model: logit s(x_t, t, text) [B]; reward r = sigmoid(s). `loss` names the
    objective it is trained with (RM_LOSSES); it travels with the checkpoint, as the architecture does."""

    def __init__(self, transformer, blocks: int = 8, heads: int = 8, pooling: str = "query", loss: str = "bce",
                 gradient_checkpointing: bool = False):
        super().__init__()
        common.require(blocks <= len(transformer.blocks), f"--rm-blocks {blocks} > its {len(transformer.blocks)} blocks", 2)
        self.blocks, self.heads, self.pooling, self.loss = blocks, heads, pooling, loss
        # Eq. (4): a copy of the generator's embeddings and first blocks, never of the rest (a full fp32 copy of 14B
        # is 56 GB); the generator is untouched. fp32 master weights, bf16 autocast with --dtype bf16.
        every, transformer.blocks = transformer.blocks, transformer.blocks[:blocks]
        self.dit, transformer.blocks = copy.deepcopy(transformer).float(), every
        if getattr(self.dit, "peft_config", None):  # a generator with LoRA attached: keep the base weights only
            self.dit.unload_lora()
        self.dit.requires_grad_(False)       # patch / text / time embeddings stay frozen ...
        self.dit.blocks.requires_grad_(True)  # ... the blocks are fine-tuned (paper Sec. 4.2, official code)
        if gradient_checkpointing:  # also in PRFL: the reward's backward runs through the 8 blocks
            self.dit.enable_gradient_checkpointing()
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.pool = QueryAttention(dim, heads, residual=pooling == "query") if pooling in ("query", "attn") else None
        self.mlp = nn.Sequential(nn.Linear(dim, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 1))
        for layer in self.mlp[::2]:  # official init: xavier weights, zero biases
            nn.init.xavier_uniform_(layer.weight), nn.init.zeros_(layer.bias)

    def config(self) -> dict:  # what the checkpoint metadata and summary.json record
        return dict(blocks=self.blocks, heads=self.heads, pooling=self.pooling, loss=self.loss)

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("dit.")]

    def features(self, x, sigma, embeds):
        """Eq. (4): raw tokens after block `blocks` (no final norm), [B, N, D]; blocks beyond never run."""
        return common.dit_prefix_features(self.dit, x, 1000 * sigma, embeds, taps=(self.blocks,))["hidden"][0]

    def forward(self, x, sigma, embeds):
        h = self.features(x, sigma, embeds)
        z = h.mean(1) if self.pooling == "mean" else h.amax(1) if self.pooling == "max" else self.pool(h)
        return self.mlp(z.to(self.mlp[0].weight.dtype)).squeeze(-1).float()  # [B] logits


def bce_loss(logits, labels):
    """Eq. (6): binary cross-entropy of sigmoid(s) against the good/bad label."""
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def bradley_terry_loss(logits, labels):
    """Tab. 7's alternative (official `loss: bt`): rows i and i + B/2 are a (good, bad) pair, in either order, at
    one sigma and one noise (pavrm_step); -log sigmoid(s_good - s_bad), the mean over the pairs."""
    (a, b), sign = logits.view(2, -1), labels.float().view(2, -1).diff(dim=0)[0]  # sign -1: a is the good one
    return F.softplus(sign * (a - b)).mean()


RM_LOSSES = dict(bce=bce_loss, bt=bradley_terry_loss)  # --rm-loss -> function; PAVRM.loss names one


def build_pavrm(args, transformer, ckpt: str = "") -> PAVRM:
    """The run's PAVRM: from a checkpoint (its own architecture and loss) or new from the flags."""
    return load_pavrm(ckpt, transformer, args.gradient_checkpointing) if ckpt else \
        PAVRM(transformer, args.rm_blocks, args.rm_heads, args.rm_pooling, args.rm_loss, args.gradient_checkpointing)


def save_pavrm(pavrm: PAVRM, path, backbone: str):
    common.save_safetensors(pavrm.state_dict(), path, metadata=dict(pavrm.config(), backbone=backbone))


def read_pavrm_meta(path) -> dict:
    """A PAVRM checkpoint's metadata (no tensor loaded); anything else is a UserError naming the file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    common.require({"blocks", "heads", "pooling"} <= set(meta), f"{path}: no PAVRM metadata (blocks/heads/pooling)")
    return dict(meta, loss=meta.get("loss", "bce"))  # (an older checkpoint: bce)


def load_pavrm(path, transformer, gradient_checkpointing: bool = False) -> PAVRM:
    """Rebuild the architecture named in the checkpoint's metadata and load it strictly."""
    meta = read_pavrm_meta(path)
    pavrm = PAVRM(transformer, int(meta["blocks"]), int(meta["heads"]) or 8, meta["pooling"], meta["loss"],
                  gradient_checkpointing)
    try:
        pavrm.load_state_dict(load_file(str(path)))
    except RuntimeError as e:  # missing / unexpected keys, shapes of another backbone
        raise UserError(f"{path} does not fit this backbone: {str(e)[:600]}") from None
    return pavrm


# ==== PRFL: Alg. 1, Eqs. (7)-(10)
def sample_cutoff(num_steps: int, m_range: str = "full", generator=None) -> int:
    """m ~ U{0..N-2} (official randint(0, 38) for N = 40), so t_{m+1} > 0; Tab. 3 restricts it to a third."""
    third = num_steps // 3
    lo, hi = dict(full=(0, num_steps - 2), early=(0, third - 1), middle=(third, 2 * third - 1),
                  late=(2 * third, num_steps - 2))[m_range]
    return int(torch.randint(lo, max(lo, hi) + 1, (), generator=generator).item())


def process_reward(transformer, pavrm, embeds, shape, sigmas, m: int, generator=None):
    """Alg. 1 lines 9-14: noise -> (no grad) x_m -> ONE step with grad -> x_{m+1}; r = sigmoid(PAVRM(x_{m+1}, t_{m+1}))."""
    x = common.local_batch(torch.randn(world(shape[0]), *shape[1:], generator=generator)).to(embeds.device)  # on the CPU
    # Eqs. (7)-(8): gradient reaches the generator only through the transformer call of step m
    x, _ = common.rollout(transformer, x, embeds, sigmas, 0, m + 1, grad_steps=[m])
    sigma = sigmas[m + 1].to(x.device).expand(len(x))
    return torch.sigmoid(pavrm(x, sigma, embeds))  # the still-noisy latent, never decoded


def prfl_loss(r, weight: float = 0.1, target: float = 2.0):
    """Eq. (9): L_PRFL = lambda * relu(target - r); with r in (0,1) this is lambda * (2 - r) (official)."""
    return weight * F.relu(target - r).mean()


def sft_loss(transformer, x0, embeds, shift: float = 5.0, generator=None):
    """Eq. (10): flow matching on real latents, ||v(x_sigma) - (eps - x0)||^2, sigma = shift(s), s uniform."""
    eps = common.local_batch(torch.randn(world(len(x0)), *x0.shape[1:], generator=generator, dtype=x0.dtype)).to(x0.device)
    sigma = common.local_batch(common.sample_train_sigma(world(len(x0)), shift, generator, device=x0.device))
    v = common.predict_velocity(transformer, common.add_noise(x0, eps, sigma), sigma, embeds)
    return F.mse_loss(v, common.velocity_target(x0, eps))


def drop_prompts(embeds, null_embed, p: float, generator=None):
    """Official dataset: the text is the empty prompt with probability p (keeps CFG alive)."""
    drop = common.local_batch(torch.rand(world(len(embeds)), generator=generator) < p).to(embeds.device)
    return torch.where(drop[:, None, None], null_embed.to(embeds), embeds)


# ==== Training steps and stages (torchrun: each rank draws the whole batch's noise and keeps its share; docs/prfl.md)
def world(n: int = 1) -> int:  # n local rows -> the global batch's rows
    return n * common.rank_world()[1]


def split_items(n: int, device):
    """This rank's share of n evaluation items, padded with the last item so every rank runs as many forwards (the
    sharded models' collectives need it), and the function that joins the ranks' results in order (NCCL: on CUDA)."""
    mine = common.local_batch(torch.cat([torch.arange(n), torch.full((-n % world(),), n - 1)]))
    return mine.tolist(), lambda x: common.gather(x.to(device))[:n].cpu()


def mean_over_ranks(**values) -> dict:  # a logged step mean: the mean of the ranks' means over equal shares
    return {k: common.gather(v.detach().float().reshape(1)).mean() for k, v in values.items()}


def autocast(device, dtype: str | None = None):
    """bf16 autocast over fp32 PAVRM / LoRA / full fine-tune weights when the DiT is bf16 (--dtype), on any device."""
    return torch.autocast((device := torch.device(device)).type, dtype=torch.bfloat16,
                          enabled=common.pick_dtype(dtype, device) == torch.bfloat16)


def check_finite(loss, step: int, stage: str):  # a diverged run ends in a named error before the optimiser step
    common.require(torch.isfinite(loss), f"{stage}: loss is {loss.item()} at step {step}; lower the learning rate")


def pavrm_step(args, pavrm, x0, y, embeds, generator=None):
    """Forward + backward of one PAVRM step: Eq. (6) (or BT) on x_t = (1-sigma) x0 + sigma eps."""
    (lo, hi), k = args.rm_sigma_range, 2 if pavrm.loss == "bt" else 1  # BT: a pair shares sigma and noise (official)
    n = world(len(x0)) // k  # the global batch's rows (BT: pairs), drawn on every rank; each keeps its share
    sigma = lo + (hi - lo) * common.local_batch(common.sample_train_sigma(n, args.rm_sigma_shift, generator, x0.device)).repeat(k)
    eps = torch.cat([common.local_batch(torch.randn(n, *x0.shape[1:], generator=generator, dtype=x0.dtype))] * k).to(x0.device)
    with autocast(x0.device, args.dtype):
        logits = pavrm(common.add_noise(x0, eps, sigma), sigma, embeds)
    loss = RM_LOSSES[pavrm.loss](logits, y)
    loss.backward()
    return loss, logits, sigma


def train_pavrm(args, pavrm, data, idx, device, run):
    """Stage 1: pavrm_step on random training rows (BT: rm_batch / 2 random good rows, then as many bad ones, so
    rows i and i + B/2 pair up); AdamW with the paper's two learning rates; checkpoints and resume through run."""
    bt, keys = pavrm.loss == "bt", ["latents", "label", "prompt_idx"]
    common.local_batch(torch.empty(batch := max(1, args.rm_batch // 2) if bt else args.rm_batch))  # divides over ranks
    common.shard(pavrm.dit, *[m for m in (pavrm.pool, pavrm.mlp) if m is not None])  # torchrun: FSDP2; else nothing
    opt = torch.optim.AdamW([dict(params=pavrm.dit.blocks.parameters(), lr=args.rm_lr_blocks), dict(
        params=pavrm.head_parameters(), lr=args.rm_lr_head)], betas=(0.9, 0.999), weight_decay=args.rm_weight_decay,
        foreach=True)  # foreach (each AdamW here): a CPU's default loops over the tensors; the same numbers, ~2x faster
    timer, pavrm, pools = rundir.StepTimer(device), pavrm.train(), [idx[data["label"][idx] == c] for c in (1, 0)]
    g = torch.Generator().manual_seed(args.seed)  # sigma, noise: no global RNG; rows: (seed, step) (BT: good, then bad)
    feeds = [dataset.batches(data, keys, batch, args.seed + c, run.start_step("rm"), rows=p)
             for c, p in enumerate(pools if bt else [idx])]
    for step, *parts in zip(run.steps("rm", args.rm_steps, dict(pavrm=pavrm), opt, generators=dict(rm=g),
                                      every=args.checkpoint_every, stop_at=args.max_steps, desc="PAVRM"), *feeds):
        with timer:
            b = {k: torch.cat([p[k] for p in parts]) for k in keys}
            x0, y = b["latents"].to(device), b["label"].to(device)
            opt.zero_grad(set_to_none=True)
            loss, logits, sigma = pavrm_step(args, pavrm, x0, y, data["prompt_embeds"][b["prompt_idx"]].to(device), g)
            check_finite(loss, step, "PAVRM")
            torch.nn.utils.clip_grad_norm_(pavrm.dit.blocks.parameters(), args.grad_clip)  # official: blocks only
            opt.step()
        run.log(step, "rm", **mean_over_ranks(loss=loss, train_acc=((logits > 0).float() == y).float().mean(),
                                              sigma_mean=sigma.mean()))
    return timer


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)): P(score of a good > score of a bad). Not in the paper;
    unlike accuracy of s > 0 it does not depend on the class balance, so 0.5 is chance at every noise level."""
    n_pos, n_neg = (pos := labels > 0.5).sum().item(), (~pos).sum().item()
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # one class only (a tiny held-out split): no pair to rank
    ranks = scores.argsort().argsort().float() + 1
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


@torch.no_grad()
def evaluate_pavrm(pavrm, data, idx, device, edges=TAB5_EDGES, dtype=None, batch: int = 64, seed: int = 1234) -> dict:
    """Tab. 5: accuracy of (s > 0) on held-out latents, one sigma per sample drawn in each noise interval (lo, hi]
    between consecutive `edges`; also the AUC of s per interval and the majority class (accuracy's chance level)."""
    g, acc, area, y, _ = torch.Generator().manual_seed(seed), {}, {}, data["label"][idx], pavrm.eval()
    for lo, hi in zip(edges, edges[1:]):
        logits = []
        for i in range(0, len(idx), batch):  # a chunk at a time from disk; each rank scores its share of a chunk
            b = idx[i:i + batch]
            sigma = hi - (hi - lo) * torch.rand(len(b), generator=g)  # (lo, hi]
            eps, (mine, join) = torch.randn(len(b), *data["latents"].shape[1:], generator=g), split_items(len(b), device)
            x_t = common.add_noise(data["latents"][b[mine]], eps[mine], sigma[mine])
            with autocast(device, dtype):
                s = pavrm(x_t.to(device), sigma[mine].to(device), data["prompt_embeds"][data["prompt_idx"][b[mine]]].to(device))
            logits.append(join(s.float()))
        s, key = torch.cat(logits), f"({lo:g},{hi:g}]"
        acc[key], area[key] = ((s > 0).float() == y).float().mean().item(), auc(s, y)
    return dict(pavrm_accuracy=acc, pavrm_accuracy_mean=sum(acc.values()) / len(acc), pavrm_auc=area,
                pavrm_majority_class=max(y.mean().item(), 1 - y.mean().item()), pavrm_test_size=len(idx))


def prepare_prfl(args, transformer, pavrm) -> list:
    """PRFL's trainable weights (LoRA, or all with --full-finetune); the PAVRM frozen, fp32 under autocast (code)."""
    pavrm.eval().requires_grad_(False)  # frozen during PRFL (paper and code); never cast to the generator's bf16
    params = list(transformer.float().requires_grad_(True).parameters()) if args.full_finetune else \
        common.add_lora(transformer, args.lora_rank, adapter_name="prfl")  # full: fp32 master weights, bf16 autocast
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return params


def prfl_step(args, transformer, pavrm, x0, embeds, sigmas, m: int | None = None, generator=None):
    """Forward + backward of one PRFL micro-batch: L_SFT on real latents (Eq. 10), then (m drawn here unless
    given) L_PRFL of the one gradient step at m (Eqs. 7-9). Two backward passes: never both graphs at once."""
    with autocast(x0.device, args.dtype):
        l_sft = sft_loss(transformer, x0, embeds, args.sft_sigma_shift, generator) if args.sft_weight else torch.zeros(())
    if args.sft_weight:
        (args.sft_weight * l_sft / args.grad_accum).backward()
    m = sample_cutoff(args.num_steps, args.m_range, generator) if m is None else m  # Alg. 1 line 9 (estimate: m = 0)
    with autocast(x0.device, args.dtype):  # real latents give only the shape (official)
        r = process_reward(transformer, pavrm, embeds, x0.shape, sigmas, m, generator)
    l_prfl = prfl_loss(r, args.reward_weight, args.reward_target)
    (l_prfl / args.grad_accum).backward()
    return l_sft.detach(), l_prfl.detach(), r.detach(), m


def train_prfl(args, pipe, pavrm, sft, null_embed, device, run):
    """Stage 2: prfl_step on batches of the SFT set (the same text batch for both losses), AdamW, constant lr."""
    tr, lr = pipe.transformer, args.full_finetune_lr if args.full_finetune else args.lr
    common.local_batch(torch.empty(args.batch_size))  # a batch that does not divide over the processes: a UserError
    common.require(world() == 1 or not args.full_finetune, "--full-finetune: one process (its embeddings are unsharded)", 2)
    params, _ = prepare_prfl(args, tr, pavrm), common.shard(tr)  # torchrun: FSDP2 per block, LoRA included; it
    params = [q for q in tr.parameters() if q.requires_grad] if world() > 1 else params  # replaced the parameters
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, foreach=True)
    sigmas = common.sigma_schedule(args.num_steps, args.flow_shift).to(device)
    timer, _, g = rundir.StepTimer(device), tr.train(), torch.Generator().manual_seed(args.seed + 1)  # no global RNG
    # micro-batch j of optimiser step s is batch s * grad_accum + j of the SFT rows: a function of (seed, s, j)
    feed = dataset.batches(sft, ["latents", "prompt_idx"], args.batch_size, args.seed + 1,
                           run.start_step("tune") * args.grad_accum, rows=sft.get("rows"))
    for step in run.steps("tune", args.tune_steps, dict(transformer=tr), opt, generators=dict(tune=g),
                          every=args.checkpoint_every, stop_at=args.max_steps, desc="PRFL"):
        with timer:
            for _ in range(args.grad_accum):
                b = next(feed)
                embeds = drop_prompts(sft["prompt_embeds"][b["prompt_idx"]].to(device), null_embed,
                                      args.null_prompt_prob, g)
                l_sft, l_prfl, r, m = prfl_step(args, tr, pavrm, b["latents"].to(device), embeds, sigmas, None, g)
                check_finite(l_prfl + l_sft, step, "PRFL")  # before the optimiser step: no NaN reaches the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        run.log(step, "tune", **mean_over_ranks(sft=l_sft, prfl=l_prfl, pavrm_reward=r.mean()), m=m, grad_norm=grad_norm)
    tr.eval()
    return timer


@torch.no_grad()
def evaluate_generator(args, pipe, pavrm, embeds, prompts, null_embed, on_toy: bool, tag: str, run) -> dict:
    """Fresh samples for held-out prompts from fixed seeds: true toy reward, PAVRM score and mean r, process reward."""
    n, dev = args.eval_samples, pipe.transformer.device
    rows, seeds = [i % len(prompts) for i in range(n)], [10_000 + i for i in range(n)]  # the same seeds before / after
    mine, join = split_items(n, dev)  # torchrun: each rank samples and scores its share
    lat = common.sample_latents(pipe, embeds[[rows[i] for i in mine]], [seeds[i] for i in mine], num_steps=args.num_steps,
                                shift=args.flow_shift, guidance_scale=args.guidance_scale, negative_embeds=null_embed,
                                desc=f"sampling ({tag})")
    sigma = torch.rand(n, generator=(g := torch.Generator().manual_seed(99)))[mine]  # PAVRM score: one random t each
    x_t = common.add_noise(lat, torch.randn(n, *lat.shape[1:], generator=g)[mine], sigma)
    with autocast(dev, args.dtype):
        r = torch.sigmoid(torch.cat([pavrm(x_t[i:i + 16].to(dev), sigma[i:i + 16].to(dev),
                                           embeds[[rows[j] for j in mine[i:i + 16]]].to(dev)) for i in range(0, len(mine), 16)]))
    r = join(r.float())
    out = dict(pavrm_score=(r > 0.5).float(), pavrm_reward=r,  # the paper's score: the share judged qualified
               process_reward=process_reward_eval(args, pipe, pavrm, embeds[rows], seeds))
    if on_toy:  # the decoded pixel-space toy reward: the ground truth the labels came from
        out = dict(true_reward=join(toy.true_reward(pipe, lat, [prompts[rows[i]] for i in mine])), **out)
    lat = join(lat) if args.save_videos else lat  # (every rank calls export_video; rank 0 writes)
    for i in range(min(args.save_videos, n)):
        video = common.decode_latents(pipe, lat[i:i + 1].to(pipe.vae.device))[0]
        rundir.export_video(video, run.dir / "videos" / f"{tag}_seed{seeds[i]}.mp4")
    return out


@torch.no_grad()
def process_reward_eval(args, pipe, pavrm, embeds, seeds) -> torch.Tensor:
    """The quantity PRFL maximises, without gradient: r(x_{m+1}, t_{m+1}) of conditional rollouts from the
    fixed seeds, with m = i mod (N-1) so every cut-off is covered; [n]."""
    dev, n, shape = pipe.transformer.device, len(seeds), common.backbone_geometry(pipe)["latent_shape"]
    sigmas = common.sigma_schedule(args.num_steps, args.flow_shift).to(dev)
    m, r = torch.arange(n) % max(1, args.num_steps - 1), torch.zeros(n)
    for k in m.unique().tolist():
        group = (m == k).nonzero()[:, 0]
        mine, join = split_items(len(group), dev)  # this rank's share of the group (torchrun)
        idx = group[mine]
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seeds[i])) for i in idx]).to(dev)
        with autocast(dev, args.dtype):
            x, _ = common.rollout(pipe.transformer, x, embeds[idx].to(dev), sigmas, 0, k + 1)
            r[group] = join(torch.sigmoid(pavrm(x, sigmas[k + 1].expand(len(idx)), embeds[idx].to(dev))).float())
    return r


# ==== Flags, files and data, all checked before any model loads (issue #19); main
def read_inputs(args) -> dict:
    """The files and data of a run, checked before any model loads: the backbone's config (a hub id's comes with its
    weights: load_data checks then), --out-dir writable, --reward-ckpt's metadata = the --rm-* flags, the video size
    (typed, else --data's, else the backbone's), --data and --sft-data (lazily), --out-dir new or --resume."""
    hub = args.backbone.count("/") == 1 and not Path(args.backbone).expanduser().exists()
    cfg = None if hub and all(args.backbone != c["repo"] for c in common.WAN_CONFIGS.values()) else \
        common.backbone_config(args.backbone)
    rundir.check_writable(args.out_dir or "runs")
    ckpt = args.reward_ckpt  # --stage tune needs one
    common.require(args.stage != "tune" or ckpt, "--stage tune needs --reward-ckpt (a PAVRM from --stage rm)", 2)
    rm = read_pavrm_meta(ckpt) if ckpt else {}  # a PAVRM from elsewhere: its recorded configuration = the flags
    differ = [f"--rm-{k} {getattr(args, 'rm_' + k)} (its metadata: {rm[k]})"
              for k in ("blocks", "heads", "pooling", "loss") if rm and rm[k] != str(getattr(args, "rm_" + k))]
    common.require(not differ, f"--reward-ckpt {ckpt} is another PAVRM: {', '.join(differ)}", 2)
    data, meta = dataset.load(args.data, "binary", lazy=True) if args.data else (None, {})  # latents stay on disk
    typed = dataset.video_size(meta, args.data, **{k: getattr(args, k) for k in SIZE})  # meta.json's is the default
    size = [typed[k] or (cfg or {}).get(k) for k in SIZE]
    common.require(args.data or size == [cfg[k] for k in SIZE], "--height / --width / --num-frames need --data (the toy "
                   f"world is {'x'.join(str((cfg or {}).get(k)) for k in SIZE)})", 2)  # (no cfg: a hub id, needs --data)
    sft = dataset.load(args.sft_data, lazy=True)[0] if args.sft_data else None
    common.require(sft is None or {"latents", "prompt_idx"} <= set(sft), f"{args.sft_data}: no 'latents' / "
                   "'prompt_idx'; L_SFT needs latents of real videos with their prompts (prepare.py: video, prompt)")
    geo = cfg and common.geometry(cfg, *size)  # the size checked against the backbone, no weights
    for where, d in [(w, d) for w, d in ((args.data, data), (args.sft_data, sft)) if d is not None and geo]:
        dataset.check_latents(d, geo, where)
    if data is not None:
        bad = ((data["label"] != 0) & (data["label"] != 1)).nonzero()[:5, 0]
        common.require(not len(bad), f"{args.data}: 'label' must be 0 or 1; rows {bad.tolist()} hold "
                       f"{data['label'][bad].tolist()}")
    data = data and dataset.drop_repeats(data, "binary", args.on_duplicates, args.data)
    sft = sft and dataset.drop_repeats(sft, "prompts", args.on_duplicates, args.sft_data)
    split = data and dataset.split_indices(len(data["label"]), args.test_fraction, seed=0)
    if data and (seen := data["label"][split[0]].unique()).numel() < 2:
        raise UserError(f"{args.data}: the training split ({len(split[0])} of {len(data['label'])} rows, --test-fraction"
                        f" {args.test_fraction}) has labels {seen.tolist()}; PAVRM needs good and bad examples")
    out = Path(args.out_dir) if args.out_dir else None  # rundir.Run's rule, here before anything loads
    common.require(bool(out and out.is_dir() and any(out.iterdir())) == args.resume, f"--out-dir {out} " + (
        "holds no run to --resume" if args.resume else "already holds a run: --resume it, or choose another folder"), 2)
    return dict(data=data, meta=meta, sft=sft, split=split, size=size, ckpt=ckpt)


def load_data(args, pipe, inputs: dict | None = None):
    """The dataset (or the toy world), its fixed split and the SFT set, checked against the loaded backbone."""
    inputs = inputs or read_inputs(args)
    data, meta, sft = inputs["data"], inputs["meta"], inputs["sft"]
    if data is None:
        data, meta = toy.toy_dataset(pipe, "binary", args.toy_size, seed=0, cache_dir=args.toy_cache)
    for where, d in ((args.data or args.toy_cache, data), (args.sft_data, sft or data)):
        dataset.check_latents(d, common.backbone_geometry(pipe), where, keys=("latents",))
    train_idx, test_idx = inputs["split"] or dataset.split_indices(len(data["latents"]), args.test_fraction, seed=0)
    if sft is None:  # the good training rows, by number (not copied): the paper's SFT set is qualified real footage
        sft = dict({k: data[k] for k in ("latents", "prompt_idx", "prompt_embeds")}, rows=train_idx[data["label"][train_idx] > 0.5])
    return data, meta, train_idx, test_idx, sft


def estimate_memory(args) -> dict:
    """--estimate-memory: loading, pavrm_step and prfl_step (m = 0; E[m] no-grad forwards counted) on fake tensors
    of the backbone's config (no weights, no data), bf16 as on CUDA (estimate.StageEstimates); tiny: measured, fp32."""
    common.geometry(common.backbone_config(args.backbone), *(size := [getattr(args, k) for k in SIZE]))  # a bad size: refused

    def generator_and_pavrm(tune: bool):
        pavrm = build_pavrm(args, tr := est.pipeline(gradient_checkpointing=args.gradient_checkpointing).transformer)
        return tr, pavrm, prepare_prfl(args, tr, pavrm) if tune else None

    with estimate.StageEstimates("PRFL", args.backbone, *size) as est:
        est.load_phase()
        args = dataclasses.replace(args, dtype="fp32" if est.real else "bf16")
        x0, embeds, _ = est.inputs(k := 1 + (args.rm_loss == "bt"))  # a BT step scores a (good, bad) pair
        _, pavrm, _ = est.build(lambda: generator_and_pavrm(False))
        est.step("PAVRM step", pavrm_step, args, pavrm, x0, torch.tensor([1.0, 0.0][:k]), embeds)
        tr, pavrm, _ = est.build(lambda: generator_and_pavrm(True))
        est.step("PRFL step (SFT + 1 step with grad + PAVRM)", prfl_step, args, tr, pavrm, x0[:1], embeds[:1],
                 common.sigma_schedule(args.num_steps, args.flow_shift), 0, rollout_forwards=(args.num_steps - 2) / 2)
    return est.results


def main(args: Args) -> dict:
    e, r = args.eval_sigma_edges, args.rm_sigma_range  # flag errors (exit 2) that parse_args' ranges leave
    common.require(len(e) >= 2 and e == sorted(set(e)), f"--eval-sigma-edges {e}: must be 2+ increasing values", 2)
    common.require(len(r) == 2 and r[0] < r[1], f"--rm-sigma-range {r}: must be lo hi with lo < hi", 2)
    common.require(args.data or args.estimate_memory or args.backbone == "tiny", "the toy world exists only for "
                   "--backbone tiny; pass --data <dataset folder> (prepare.py)", 2)
    if args.estimate_memory:
        return estimate_memory(args)
    inputs = read_inputs(args)  # every file and dataset checked before any model loads
    rundir.seed_everything(args.seed)
    device = rundir.pick_device(args.device)
    pipe = common.load_backbone(args.backbone, device, common.pick_dtype(args.dtype, device), *inputs["size"])
    data, meta, train_idx, test_idx, sft = load_data(args, pipe, inputs)
    geo, ckpt, on_toy = common.backbone_geometry(pipe), inputs["ckpt"], not args.data
    args.height, args.width, args.num_frames = (geo[k] for k in SIZE)  # args.json records what runs
    args.dtype = "bf16" if pipe.transformer.dtype == torch.bfloat16 else "fp32"
    prompts = args.eval_prompts or (toy.toy_prompts("eval") if on_toy else meta["prompts"][:16])
    eval_embeds, _ = common.encode_prompts(pipe, prompts)
    null_embed = common.encode_prompts(pipe, [""])[0].to(device)
    common.drop_text_encoder(pipe)  # every prompt is cached; T5 never sits next to the training graph
    pavrm = build_pavrm(args, pipe.transformer, ckpt).to(device)
    run = rundir.Run("prfl", args, args.out_dir or None, args.resume)  # only now: a failed start leaves no folder
    summary = dict(backbone=args.backbone, run_dir=str(run.dir), reward_ckpt=ckpt or None, pavrm=pavrm.config())
    if not ckpt:
        t = train_pavrm(args, pavrm, data, train_idx, device, run)
        save_pavrm(pavrm, run.dir / "pavrm.safetensors", args.backbone)
        rundir.plot_metrics(run, "rm", ["loss", "train_acc"], "PAVRM training (Eq. 6)")
        run.resume &= not t.times  # it trained on (a resume): a later stage's checkpoint is stale, it starts afresh
        if t.times:  # not when a resume found the stage finished
            summary.update(rm_seconds_per_step=t.seconds_per_step, rm_peak_memory_gib=t.peak_memory_gib())
    summary.update(ev := evaluate_pavrm(pavrm, data, test_idx, device, e, args.dtype))
    rows = [dict(noise_interval=k, pavrm_accuracy=a, auc=ev["pavrm_auc"][k]) for k, a in ev["pavrm_accuracy"].items()]
    mid, chance = [(a + b) / 2 for a, b in zip(e, e[1:])], [ev["pavrm_majority_class"]] * len(rows)
    rundir.plot(run.dir / "pavrm_accuracy.png", dict(accuracy=(mid, [r["pavrm_accuracy"] for r in rows]), auc=(mid, [
        r["auc"] for r in rows]), majority_class=(mid, chance)), "PAVRM on held-out latents (Tab. 5)", "sigma (middle)")
    rows.append(dict(noise_interval="mean", pavrm_accuracy=ev["pavrm_accuracy_mean"],
                     auc=sum(ev["pavrm_auc"].values()) / len(rows)))
    tables = [rundir.format_table(rows) + f"\nchance: accuracy {ev['pavrm_majority_class']:.3f} (majority class of "
              f"{len(test_idx)} held-out latents), AUC 0.5" + ("" if pavrm.loss == "bce" else
              f"; a {pavrm.loss}-trained logit has no fixed zero, so accuracy of s > 0 is arbitrary: read the AUC")]
    saved = f"PAVRM: {ckpt or run.dir / 'pavrm.safetensors'} (--reward-ckpt it; in Python prfl.load_pavrm)"
    if args.stage != "rm":
        evaluate = lambda tag: evaluate_generator(args, pipe, pavrm, eval_embeds, prompts, null_embed, on_toy, tag, run)
        before = evaluate("before")
        t = train_prfl(args, pipe, pavrm, sft, null_embed, device, run)
        after = evaluate("after")
        out = run.dir / ("transformer" if args.full_finetune else "lora")
        pipe.transformer.save_pretrained(out) if args.full_finetune else common.save_lora(pipe.transformer, out, "prfl")
        saved += (f"\n  fine-tuned {out.name}: {out}/ -> WanPipeline.from_pretrained('{args.backbone}'" +
                  (f", transformer=WanTransformer3DModel.from_pretrained('{out}'))" if args.full_finetune else
                   f").load_lora_weights('{out}')"))
        paired, rows = rundir.paired_summary(before, after)
        summary.update(paired, tune_seconds_per_step=t.seconds_per_step, tune_peak_memory_gib=t.peak_memory_gib(),
                       eval_prompts=len(prompts), eval_samples=args.eval_samples)
        tables.append(rundir.format_table(rows))
        summary["claims"] = [dict(claim="true-reward gain of the PRFL LoRA over the base, held-out toy prompts paired "
                                  "by seed", mean=g[0], se=g[1]) for g in [summary.get("true_reward_gain")] if g]
        rundir.plot_metrics(run, "tune", ["sft", "prfl", "pavrm_reward"], "PRFL: L_SFT, L_PRFL, PAVRM reward r")
    run.summary(summary)
    print("\n\n".join(tables) + f"\nrun folder: {run.dir}\n  {saved}\n  plots: " +
          ", ".join(p.name for p in sorted(run.dir.glob("*.png"))))
    return summary


if __name__ == "__main__":
    rundir.cli(main, Args, TINY)
