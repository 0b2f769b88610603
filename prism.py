"""PRISM: "Through the PRISM: Preference Representation in Intermediate States of Video Diffusion Models"
(Wu et al., arXiv 2606.20310).

A frozen video DiT already encodes preference in its noisy latents: its first N_b = 12 blocks read (z_t, prompt, t)
under no_grad; a small head (projected [video tokens ; text tokens], ONE learnable query attending to them, a 5-layer
MLP) gives r(z_t, c, t), trained on A / B / tie pairs with the Rao-Kupper likelihood (eta = 5), both videos at the same
t and noise. Early Best-of-N: N trajectories denoise together for k steps, the head keeps one, only it finishes.

Equation -> code
    Eq. (1)   z_t = (1 - t/T) z_0 + (t/T) eps, same t and eps for A and B   noisy_pair (common.add_noise)
    Eq. (2)   F_vis, F_txt = first N_b blocks of the frozen DiT            backbone_features (dit_prefix_features)
    §3.2      F_uni = [F_vis; F_txt], 1-query cross-attention, 5-layer MLP  PRISMHead  (--pooling mean: Tab. 3)
    Eq. (3)   Rao-Kupper P(A>B), P(B>A), P(A=B)                             rao_kupper_probs, rao_kupper_log_probs
    Eq. (4)   L_BTT = -E_t log P_eta(y | z_t^A, z_t^B, c, t)                rao_kupper_nll, head_step, train_head
    --loss    rao-kupper | bradley-terry (ablation), the one switch          preference_nll, loss_config
    Tab. 1    accuracy w/o ties and tie-calibrated accuracy vs t            accuracy_without_ties, accuracy_with_ties
    Fig. 3    early Best-of-N at step k (toy: read off one rollout of all N)  early_best_of_n, evaluate_bon

Where this differs from the paper text (no official code; notes in shared/reference/prism.md):
  * Printed Eq. (3) has P(A>B) = e^rA / (e^rB + eta e^rA), which does not normalise; standard Rao-Kupper is used.
  * Unreported head details follow PAVRM (HY-Video-PRFL): 8 heads, xavier query, GELU MLP of width D; ours: LayerNorm
    before the projection, text pads masked. 21.2M trainable parameters at D = 1536 (paper: 21.8M).
  * Training: t ~ U{0..999}, sigma = t/1000 (unshifted); Best-of-N scores at the shifted sigma the sampler reached,
    with common.rollout's Euler (not UniPC) at the checkpoint's own flow shift (a folder's scheduler_config.json).
  * Accuracy w/ ties: max over thresholds eps in {|m_i|} (Ties Matter, arXiv 2305.14324). VideoAlign's code (VideoGen-
    RewardBench's) also scores inside equal |m|: up to 0.22 higher with integer scores (--tie-sweep videoalign).
  * Best-of-N compute is counted (FLOPs of a forward / scoring pass / decode x their numbers; not the oracle's RM).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import common
import dataset
import estimate
import rundir
import toy


@dataclasses.dataclass
class Args:
    # generic
    stage: str = common.arg("all", "rm: train + test the head; bon: early Best-of-N; all", choices=["rm", "bon", "all"])
    out_dir: str = common.arg("", "run folder (default: a new runs/prism-<backbone>-<time>); an existing one: --resume")
    resume: bool = common.arg(False, "continue the run in --out-dir from its last checkpoint (same arguments)")
    checkpoint_every: int = common.arg(100, "head steps between checkpoints (also after the last, and on Ctrl-C)", min=1)
    seed: int = common.arg(0, "seed of training randomness (evaluation noise uses its own fixed seeds)")
    device: str = common.arg("auto", "auto | cpu | cuda")
    dtype: str = common.arg(None, "DiT precision; None: bf16 on CUDA, fp32 on CPU", type=str, choices=["bf16", "fp32"])
    max_steps: int = common.arg(None, "cap on the optimiser steps of every stage (here: the head's)", type=int)
    data: str = common.arg("", "'pairs' latent dataset folder (prepare.py); empty = the toy world (tiny only)")
    on_duplicates: str = common.arg("fail", "duplicate / contradicting rows in --data", choices=["fail", "drop"])
    toy_size: int = common.arg(1024, "toy world: labelled pairs (the DiNa-LRM demo's dataset: one cache)", min=2)
    toy_cache: str = common.arg("runs/toy_data", "toy world: dataset cache folder")
    test_fraction: float = common.arg(0.25, "share of PROMPTS held out (prompt-disjoint, as VLRM-Bench)", min=0, max=1)
    estimate_memory: bool = common.arg(False, "only print each stage's peak GPU memory and TFLOPs (no weights, data)")
    # backbone (frozen; nothing of it trains) and the size of what it samples
    backbone: str = common.arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a diffusers Wan folder")
    num_blocks: int = common.arg(12, "N_b: the head reads the tokens after this many DiT blocks (paper 12)", min=1)
    height: int = common.arg(None, "video height; None = the size --data records, else the backbone's", type=int)
    width: int = common.arg(None, "video width; None = as --height", type=int)
    num_frames: int = common.arg(None, "video frames (4k+1); None = as --height", type=int)
    # reward model (PRISM head)
    reward_ckpt: str = common.arg("", "head safetensors to reuse (skips training)")
    head_dim: int = common.arg(1536, "D: projection / attention / MLP width (paper 1536 for every backbone)", min=1)
    num_heads: int = common.arg(8, "attention heads (not reported; PAVRM code: 8)", min=1)
    num_queries: int = common.arg(1, "N_q learnable queries, averaged after attention (paper 1; Tab. 4: 4, 8)", min=1)
    mlp_layers: int = common.arg(5, "linear layers of the MLP to the scalar reward (paper 5)", min=1)
    pooling: str = common.arg("query", "query: learned-query attention; mean: masked mean (Tab. 3)", choices=["query", "mean"])
    loss: str = common.arg("rao-kupper", "Eq. 3-4, or BT: a tie = half a win", choices=["rao-kupper", "bradley-terry"])
    eta: float = common.arg(5.0, "Rao-Kupper tie parameter eta > 1 (paper 5.0; Tab. 4: 3, 8); rao-kupper only")
    rm_lr: float = common.arg(1e-4, "AdamW lr of the head, constant (paper)", gt=0)
    weight_decay: float = common.arg(0.01, "AdamW weight decay (not reported)", min=0)
    rm_batch: int = common.arg(16, "pairs per micro-batch (not reported)", min=1)
    grad_accum: int = common.arg(1, "micro-batches per optimiser step (not reported)", min=1)
    rm_steps: int = common.arg(5000, "optimiser steps (not reported; ~3 epochs of 26k pairs at 16)", min=1)
    eval_timesteps: list = common.arg(None, "t in [0, 1000) where accuracy is measured (Tab. 1)", min=0, max=999,
                                      factory=lambda: [989, 949, 899, 699, 499, 299, 99, 0])
    tie_sweep: str = common.arg("distinct", "w/ ties accuracy: thresholds at distinct |m| (Ties Matter), or also inside "
                                "equal |m| as VideoAlign's code (module docstring)", choices=["distinct", "videoalign"])
    # early Best-of-N (Fig. 3, Tab. 2)
    bon_n: int = common.arg(5, "N candidates per draw (paper 5)", min=1)
    bon_steps: list = common.arg(None, "k: pick after this many sampler steps (k = --num-steps: the clean latent)",
                                 min=1, factory=lambda: [1, 5, 10, 25, 50])
    num_steps: int = common.arg(50, "sampler steps (paper 50)", min=1)
    flow_shift: float = common.arg(None, "sampling shift; None = the checkpoint scheduler's", type=float, gt=0)
    guidance_scale: float = common.arg(5.0, "CFG with the empty prompt as negative (diffusers default)", min=0)
    eval_samples: int = common.arg(None, "Best-of-N draws, held-out prompts cycled; None: each once", type=int)
    bon_batch: int = common.arg(1, "draws denoised at once (each with its N candidates)", min=1)
    save_videos: int = common.arg(2, "mp4s of the picks at each k, for the first draws (into <run>/videos/)", min=0)


# The parser's defaults on --backbone tiny (a typed value always wins); why these values: docs/prism.md.
TINY = dict(head_dim=64, rm_lr=1e-3, rm_batch=32, rm_steps=1000, guidance_scale=1.0, num_steps=20,
            bon_steps=[1, 2, 5, 10, 20], eval_samples=252, bon_batch=64)


# ==== Features and head: Eqs. (1)-(2), §3.2
def noisy_pair(z_a, z_b, sigma, eps):
    """Eq. (1) for both videos of a pair at the SAME sigma with the SAME noise (§3.3: the difference of the
    two noisy latents is then (1 - sigma)(z_a - z_b), so noise never decides the comparison)."""
    return common.add_noise(z_a, eps, sigma), common.add_noise(z_b, eps, sigma)


@torch.no_grad()
def backbone_features(transformer, z_t, sigma, embeds, num_blocks: int):
    """Eq. (2): tokens after block N_b of the frozen generator and its embedded text tokens, fp32.
    no_grad: the backbone is frozen, so none of its activations are kept."""
    f = common.dit_prefix_features(transformer, z_t, 1000 * sigma, embeds, taps=(num_blocks,))
    return f["hidden"][0].float(), f["text"].float()


class PRISMHead(nn.Module):
    """§3.2: F_uni = [F_vis; F_txt] -> LayerNorm -> Linear(D_in, D) -> N_q queries attend -> MLP -> scalar."""

    def __init__(self, in_dim: int, dim: int = 1536, num_heads: int = 8, num_queries: int = 1,
                 mlp_layers: int = 5, pooling: str = "query"):
        super().__init__()
        self.config = dict(in_dim=in_dim, dim=dim, num_heads=num_heads, num_queries=num_queries,
                           mlp_layers=mlp_layers, pooling=pooling)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_queries, dim)))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        hidden = [m for _ in range(mlp_layers - 1) for m in (nn.Linear(dim, dim), nn.GELU())]
        self.mlp = nn.Sequential(*hidden, nn.Linear(dim, 1))

    def forward(self, f_vis, f_txt, txt_mask):
        tokens = self.proj(self.norm(torch.cat([f_vis, f_txt], 1)))                 # F_uni projected, [B, N+L, D]
        keep = torch.cat([torch.ones_like(f_vis[..., 0], dtype=torch.bool), txt_mask.bool()], 1)
        if self.config["pooling"] == "mean":                                                   # Tab. 3 "Pool Agg + MLP"
            agg = (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        else:
            q = self.queries.expand(len(tokens), -1, -1)
            agg = self.attn(q, tokens, tokens, key_padding_mask=~keep, need_weights=False)[0].mean(1)
        return self.mlp(agg).sum(-1)  # [B, 1] -> [B] (sum: not a view, which FSDP2 warns of)


def new_head(args, c) -> PRISMHead:
    """A fresh head of the Args' shape over a transformer of config c (its inner width is the head's input)."""
    return PRISMHead(c["num_attention_heads"] * c["attention_head_dim"], args.head_dim, args.num_heads,
                     args.num_queries, args.mlp_layers, args.pooling)


def prism_reward(transformer, head, z_t, sigma, embeds, txt_mask, num_blocks: int):
    """r(z_t, c, t): frozen prefix (no_grad) then the head (with grad when training)."""
    f_vis, f_txt = backbone_features(transformer, z_t, sigma, embeds, num_blocks)
    return head(f_vis, f_txt, txt_mask.to(z_t.device))


# ==== Rao-Kupper Bradley-Terry with ties: Eqs. (3)-(4)
def rao_kupper_probs(r_a, r_b, eta: float):
    """Eq. (3), direct form (standard Rao-Kupper; see the module docstring for the printed typo).
    Returns [..., 3] = P(A>B), P(B>A), P(A=B) in the label order. Overflows for large r: reference only."""
    pa, pb = r_a.exp(), r_b.exp()
    return torch.stack([pa / (pa + eta * pb), pb / (eta * pa + pb),
                        (eta ** 2 - 1) * pa * pb / ((pa + eta * pb) * (eta * pa + pb))], -1)


def rao_kupper_log_probs(r_a, r_b, eta: float):
    """Eq. (3) in log space, a function of d = r_A - r_B only (stable for any d):
    log P(A>B) = -softplus(log eta - d), log P(B>A) = -softplus(log eta + d),
    log P(A=B) = log(eta^2 - 1) + log P(A>B) + log P(B>A)   (divide the tie term by pi_A pi_B)."""
    if eta <= 1:
        raise ValueError(f"eta must be > 1 (eta = 1 allows no ties), got {eta}")
    d, lam = r_a - r_b, math.log(eta)
    log_a, log_b = -F.softplus(lam - d), -F.softplus(lam + d)
    return torch.stack([log_a, log_b, math.log(eta ** 2 - 1) + log_a + log_b], -1)


def rao_kupper_nll(r_a, r_b, pref, eta: float):
    """Eq. (4): mean negative log-likelihood of the labels pref in {0: A, 1: B, 2: tie}."""
    return -rao_kupper_log_probs(r_a, r_b, eta).gather(-1, pref.long()[:, None]).mean()


def bradley_terry_nll(r_a, r_b, pref):
    """Plain Bradley-Terry, P(A>B) = sigmoid(r_A - r_B), which has no tie outcome: a tie counts as half a win
    each way (soft label 1/2), which, like the Rao-Kupper tie term, pulls r_A - r_B towards 0. Ablation only."""
    target = torch.tensor([1.0, 0.0, 0.5], device=r_a.device)[pref.long()]
    return F.binary_cross_entropy_with_logits(r_a - r_b, target)


# The one switch of the likelihood (--loss): head_step (training, --estimate-memory), check_args, evaluate_accuracy's
# NLL, the checkpoint metadata and the summary all go through these two: a fork changes the loss here and nowhere else.
def preference_nll(args, r_a, r_b, pref):
    """Mean NLL of the labels pref {0: A, 1: B, 2: tie} under --loss."""
    if args.loss == "bradley-terry":
        return bradley_terry_nll(r_a, r_b, pref)
    return rao_kupper_nll(r_a, r_b, pref, args.eta)


def loss_config(args) -> dict:
    """The loss as recorded (checkpoint metadata, summary.json): its name and the parameters it reads."""
    return dict(loss=args.loss, eta=args.eta) if args.loss == "rao-kupper" else dict(loss=args.loss)


# ==== Accuracy metrics (Tab. 1; VideoGen-RewardBench protocol): human label h in {+1: A, -1: B, 0: tie}, m = r_A - r_B
def accuracy_without_ties(h, m) -> float:
    """C / (C + D) over the pairs humans did not call a tie."""
    keep = h != 0
    return (h[keep] * m[keep] > 0).float().mean().item() if keep.any() else float("nan")


def accuracy_with_ties(h, m, sweep: str = "distinct") -> float:
    """Tie-calibrated 3-way accuracy (Ties Matter, Alg. 1): |m| <= eps predicts a tie; return
    max over eps in {|m_i|} of (C + T_hm) / (C + D + T_h + T_m + T_hm) = (C + T_hm) / n.
    Sorted sweep, O(n log n): predicting ties for the j smallest |m| turns their C into T_m.
    sweep "videoalign" (--tie-sweep): every j of a stable |m| order, also inside equal |m| (VideoAlign's code)."""
    a, order = m.abs().sort(stable=True)
    h, mm = h[order], m[order]
    correct = (h * mm > 0).float()                       # C if predicted non-tie (always 0 for human ties)
    t_hm = (h == 0).float().cumsum(0)                    # human ties among the predicted ties
    c = correct.sum() - correct.cumsum(0)                # correct among the rest
    last = torch.ones_like(a, dtype=torch.bool)          # only thresholds between distinct |m| values
    last[:-1] = (sweep == "videoalign") | (a[1:] != a[:-1])
    return ((c + t_hm) / len(h))[last].max().item()


# ==== Stage 1: train the head on the frozen backbone (§3.3, §4.1), evaluate accuracy vs t (Tab. 1)
PAIR_KEYS = ("latents_a", "latents_b", "pref", "prompt_idx")  # per pair; the prompt table stays in memory


def batch_pairs(data, b, device):
    """Clean latents of A and B, prompt embeddings and mask, labels of the pairs b ({PAIR_KEYS: rows}), on the device."""
    p = b["prompt_idx"]
    return [x.to(device) for x in (b["latents_a"], b["latents_b"], data["prompt_embeds"][p], data["prompt_mask"][p], b["pref"])]


def on_ranks(fn, *xs):
    """Evaluation split over the torchrun ranks: fn on this rank's share of the rows of xs (padded with the last row
    to a multiple of the ranks), its outputs gathered whole on every rank; one process: fn(*xs)."""
    n, pad = len(xs[0]), -len(xs[0]) % common.rank_world()[1]
    out = fn(*(common.local_batch(torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) if pad else x) for x in xs))
    return tuple(common.gather(o)[:n] for o in out) if isinstance(out, tuple) else common.gather(out)[:n]


def pair_rewards(transformer, head, z_a, z_b, sigma, embeds, mask, num_blocks):
    """r_A, r_B in one batched backbone call."""
    two = (torch.cat([x, x]) for x in (sigma, embeds, mask))
    return prism_reward(transformer, head, torch.cat([z_a, z_b]), *two, num_blocks).chunk(2)


def head_step(args, transformer, head, x_a, x_b, embeds, mask, pref, sigma, eps):
    """Forward and backward of one micro-batch (train_head and --estimate-memory): Eq. (1) for A and B at the same
    sigma with the same noise, Eq. (2) + head, the loss of --loss (Eq. 4) / --grad-accum. Returns the loss."""
    z_a, z_b = noisy_pair(x_a, x_b, sigma, eps)
    r_a, r_b = pair_rewards(transformer, head, z_a, z_b, sigma, embeds, mask, args.num_blocks)
    loss = preference_nll(args, r_a, r_b, pref)
    (loss / args.grad_accum).backward()
    return loss.detach()


def train_head(args, pipe, head, data, train_idx, run, device):
    """AdamW at a constant lr; each of --rm-steps (at most --max-steps) steps: --grad-accum micro-batches of
    --rm-batch pairs, read through dataset.batches (every train pair once per epoch, the order a function of (seed,
    step)). run.steps checkpoints the head, AdamW, the noise generator and the losses: --resume is bit-identical.
    torchrun: each rank reads and trains its share of the global batch (per-pair mean; FSDP2 averages the grads)."""
    # foreach: a CPU's default AdamW loops over the tensors; the same numbers, ~2x faster
    opt = torch.optim.AdamW(head.parameters(), lr=args.rm_lr, weight_decay=args.weight_decay, foreach=True)
    g, B = torch.Generator().manual_seed(args.seed), args.rm_batch * args.grad_accum  # g: noise and t, saved by run.steps
    timer, losses = rundir.StepTimer(device), torch.full((args.rm_steps,), math.nan, dtype=torch.float64)
    steps = min(args.rm_steps, args.max_steps or args.rm_steps)
    feed = dataset.batches(data, PAIR_KEYS, B, args.seed, run.start_step("rm"), rows=train_idx)  # this rank's share
    head.train()
    for step, b in zip(run.steps("rm", args.rm_steps, dict(head=head), opt, generators=dict(batches=g),
                                 tensors=dict(losses=losses), every=args.checkpoint_every, stop_at=args.max_steps,
                                 desc="PRISM head"), feed):
        with timer:
            opt.zero_grad(set_to_none=True)
            sigma = common.local_batch(torch.randint(0, 1000, (B,), generator=g) / 1000)   # t ~ U{0..999}: the rows of b
            eps, loss = common.local_batch(torch.randn(B, *data["latents_a"].shape[1:], generator=g)), 0.0  # one per pair
            for c in torch.arange(len(sigma)).chunk(args.grad_accum):                 # --grad-accum micro-batches
                loss += head_step(args, pipe.transformer, head, *batch_pairs(data, {k: b[k][c] for k in PAIR_KEYS},
                                  device), sigma[c].to(device), eps[c].to(device)).item() / args.grad_accum
            loss = common.gather(torch.tensor([loss], dtype=torch.float64, device=device)).mean().item()  # all ranks'
            common.require(math.isfinite(loss), f"PRISM head: the loss is {loss} at step {step}: lower --rm-lr ({args.rm_lr})")
            opt.step()
        losses[step] = loss
        run.log(step, "rm", loss=loss)
    head.eval()
    return dict(steps=steps, pairs=steps * args.grad_accum * args.rm_batch, final_loss=losses[:steps][-20:].mean().item(),
                sec_per_step=timer.seconds_per_step, peak_mem_gib=timer.peak_memory_gib())


@torch.no_grad()
def evaluate_accuracy(args, pipe, head, data, test_idx, device, batch: int = 64) -> list[dict]:
    """Tab. 1: every test pair at each fixed t, one noise per pair shared by A and B and all t (its chunk's seed); the
    NLL of --loss (a function of m = r_A - r_B). Read `batch` rows at a time, each rank a share (margins gathered)."""
    h = torch.tensor([1.0, -1.0, 0.0])[pref := data["pref"][test_idx]]  # pref {0: A, 1: B, 2: tie} -> sign of r_A - r_B
    chunks, rows = test_idx.split(batch), []
    def margins(idx, eps, t):
        x_a, x_b, e, msk, _ = batch_pairs(data, {k: data[k][idx] for k in PAIR_KEYS}, device)
        sigma = torch.full((len(idx),), t / 1000, device=device)
        return torch.sub(*pair_rewards(pipe.transformer, head, *noisy_pair(x_a, x_b, sigma, eps.to(device)), sigma, e, msk,
                                       args.num_blocks))  # m = r_A - r_B
    for t in tqdm(args.eval_timesteps, desc="accuracy vs t", leave=False):
        m = torch.cat([on_ranks(lambda i, eps: margins(i, eps, t), idx, torch.randn(len(idx), *data["latents_a"].shape[
            1:], generator=torch.Generator().manual_seed(12345 + j))).cpu() for j, idx in enumerate(chunks)])
        nll = preference_nll(args, m, torch.zeros_like(m), pref).item()
        acc = accuracy_without_ties(h, m)  # its binomial SE over the strict (non-tie) pairs
        rows.append(dict(t=t, acc=acc, acc_se=math.sqrt(acc * (1 - acc) / (h != 0).sum().item()),
                         acc_ties=accuracy_with_ties(h, m, args.tie_sweep), nll=nll))
    return rows


# ==== Stage 2: early Best-of-N (Fig. 3)
@torch.no_grad()
def early_best_of_n(pipe, head, noise, embeds, txt_mask, sigmas, k: int, num_blocks: int,
                    guidance_scale: float = 1.0, negative_embeds=None):
    """noise [P, N, C, F, H, W]: all P*N trajectories take k steps together, the head scores each latent at
    the sigma it has reached (sigmas[k]; k = num_steps scores the clean latent), the argmax per prompt
    finishes alone. Returns (final latents [P, ...] of the winners, winner index [P], scores [P, N])."""
    (P, N), tr, rep = noise.shape[:2], pipe.transformer, lambda x: x.repeat_interleave(len(noise[0]), 0)
    neg = None if negative_embeds is None else negative_embeds.expand(P * N, -1, -1)
    x, _ = common.rollout(tr, noise.flatten(0, 1), rep(embeds), sigmas, 0, k, guidance_scale=guidance_scale,
                          negative_embeds=neg)
    scores = prism_reward(tr, head, x, sigmas[k].expand(P * N).to(x.device), rep(embeds), rep(txt_mask),
                          num_blocks).view(P, N)
    x = x.view(P, N, *x.shape[1:])[torch.arange(P), best := scores.argmax(1)]  # prune the other N - 1
    neg = None if negative_embeds is None else negative_embeds.expand(P, -1, -1)
    x, _ = common.rollout(tr, x, embeds, sigmas, k, len(sigmas) - 1, guidance_scale=guidance_scale, negative_embeds=neg)
    return x, best, scores


def count_flops(pipe, head, latent_shape, text_len: int, num_blocks: int, device: str = "meta") -> dict:
    """FLOPs of ONE transformer forward, ONE scoring pass (N_b blocks + head) and ONE VAE decode at batch 1 and this
    latent size, on fresh copies made on `device` ("meta": shapes only, no memory). Math attention: it is counted."""
    with torch.device(device):  # (the flop counter's module hooks want no autograd on these copies)
        tr = type(pipe.transformer).from_config(pipe.transformer.config).requires_grad_(False)
        vae = type(pipe.vae).from_config(pipe.vae.config).requires_grad_(False)
        hd = PRISMHead(**head.config).requires_grad_(False)
    x, e = torch.zeros(1, *latent_shape, device=device), torch.zeros(1, text_len, tr.config.text_dim, device=device)
    mask, t = torch.ones(1, text_len, dtype=torch.bool, device=device), torch.full((1,), 0.5, device=device)
    def flops(fn):
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()
    forward = lambda: tr(hidden_states=x, timestep=1000 * t, encoder_hidden_states=e, return_dict=False)
    return dict(forward=flops(forward), score=flops(lambda: prism_reward(tr, hd, x, t, e, mask, num_blocks)),
                decode=flops(lambda: vae.decode(x, return_dict=False)))


def bon_compute(n: int, k: int | None, steps: int, cfg: int, flops: dict) -> dict:
    """Per-prompt cost. k None: finish all n, decode all n (oracle / pixel-RM Best-of-N); n = 1: one sample;
    else the early Best-of-N: n*k + (steps - k) steps, n scoring passes, one decode."""
    fwd, score, dec = (n * steps, 0, n) if k is None else (steps, 0, 1) if n == 1 else (n * k + steps - k, n, 1)
    total = fwd * cfg * flops["forward"] + score * flops["score"] + dec * flops["decode"]
    return dict(forwards=fwd * cfg, score_passes=score, decodes=dec, gflop=total / 1e9)


@torch.no_grad()
def evaluate_bon(args, pipe, head, prompts, embeds, mask, reward_fn, run, device, negative=None) -> list[dict]:
    """Tab. 2: for each k, the reward of the pick vs a random pick (the mean over the N) and the oracle (all N finished,
    best reward), same seeds; compute per draw: early_best_of_n's. reward_fn (toy: true_reward) needs all N finished: the
    sampler being deterministic, the pick at every k is read off that one rollout (tested). None: early_best_of_n per k."""
    P, N, S, B = len(prompts), args.bon_n, args.num_steps, args.bon_batch * common.rank_world()[1]
    sigmas = common.sigma_schedule(S, sampler_shift(args, pipe)).to(device)
    shape = common.backbone_geometry(pipe)["latent_shape"]
    seed = lambda p, j: 10_000 * (args.seed + 1) + p * N + j              # candidate j of prompt p, every method
    noise = torch.stack([torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed(p, j)))
                                      for j in range(N)]) for p in range(P)])
    neg = negative.to(device) if (cfg := args.guidance_scale > 1) else None  # CFG: the empty prompt's embedding (main)
    flops = count_flops(pipe, head, shape, embeds.shape[1], args.num_blocks)
    rows = [dict(method=f"random pick (1 of {N})", **bon_compute(1, 0, S, 1 + cfg, flops)),
            dict(method=f"oracle best-of-{N} (pixel reward)", **bon_compute(N, None, S, 1 + cfg, flops))]
    chunks = [slice(i, i + B) for i in range(0, P, B)]  # torchrun: each rank denoises --bon-batch draws of a chunk
    on, ks = lambda c: (noise[c].to(device), embeds[c].to(device), mask[c].to(device)), sorted(set(args.bon_steps))
    def draw(z, e, m, rows):  # all N finish; the head's pick among them at the sigma reached after each k
        x, e, m, i, won = z.flatten(0, 1), e.repeat_interleave(N, 0), m.repeat_interleave(N, 0), 0, []
        for k in sorted({*ks, S}):
            x, i = common.rollout(pipe.transformer, x, e, sigmas, i, k, guidance_scale=args.guidance_scale,
                                  negative_embeds=None if neg is None else neg.expand(len(x), -1, -1))[0], k
            if k in ks:
                won.append(prism_reward(pipe.transformer, head, x, sigmas[k].expand(len(x)), e, m,
                                        args.num_blocks).view(-1, N).argmax(1))
        r = reward_fn(pipe, x, [prompts[p] for p in rows.tolist() for _ in range(N)]).view(-1, N).to(x.device)
        return torch.stack(won, 1), x.view(-1, N, *x.shape[1:]), r
    parts, picks = [on_ranks(draw, *on(c), torch.arange(P)[c]) for c in tqdm(chunks if reward_fn else [], desc=f"Best-of-{N}",
                                                                               leave=False)], {}
    if reward_fn:  # the random pick: the mean over the N; the oracle: the best of the N
        won, final, r_all = (torch.cat([part[i].cpu() for part in parts]) for i in range(3))
        for r, v in zip(rows, (r_all.mean(1), r_all.max(1).values)): r.update(zip(("reward", "se"), rundir.mean_se(v)))
    for k in args.bon_steps:
        rows.append(dict(method=f"PRISM step {k}", **bon_compute(N, k, S, 1 + cfg, flops)))
        if reward_fn is None:  # real data: the early Best-of-N itself (only the winner finishes); the picks are saved
            x = torch.cat([on_ranks(lambda *z: early_best_of_n(pipe, head, *z, sigmas, k, args.num_blocks,
                                                               args.guidance_scale, neg)[0], *on(c)) for c in chunks])
        else:  # the pick's true reward, paired with the random pick on the same seeds
            best = (torch.arange(P), won[:, ks.index(k)])
            x, s = final[best], rundir.paired_summary(dict(r=r_all.mean(1)), dict(r=r_all[best]))[0]
            rows[-1].update(zip(("reward", "se", "gain_vs_random", "gain_se"), s["r_after"] + s["r_gain"]))
        picks[f"step{k}"] = x
        for i in range(min(args.save_videos, P)):
            rundir.export_video(common.decode_latents(pipe, x[i:i + 1])[0], run.dir / f"videos/step{k:02d}_p{i}.mp4")
    common.save_safetensors(picks, run.dir / "bon_picks.safetensors", metadata=dict(prompts=prompts, n=N, steps=S))
    return [dict(r, rel_flops=r["gflop"] / rows[1]["gflop"]) for r in rows]  # vs the oracle


# ==== Data, checkpoints, flags: all checked before any weight loads (a failed start leaves no run folder)
SIZE, HEAD_KEYS = ("height", "width", "num_frames"), ("in_dim", "dim", "num_heads", "num_queries", "mlp_layers", "pooling")


def read_data(args, cfg):
    """--data: dataset.load checks files, keys, rows, NaN, prompt indices; here the size (meta.json's is the default, a
    typed one must agree), latent shape, O(1) values, labels, text width, duplicates, a winner. (data, meta, size)."""
    size, where = {k: getattr(args, k) for k in SIZE}, args.data
    if not where:  # the toy world, made by tiny once loaded
        return None, None, size
    data, meta = dataset.load(where, "pairs", lazy=True)  # the latents stay on disk (dataset.Rows)
    size = dataset.video_size(meta, where, **size)  # meta.json's size is the default; a typed one must agree
    dataset.check_latents(data, common.geometry(cfg, **size), where)
    rows = (data["pref"].reshape(-1, 1) != torch.tensor([0, 1, 2])).all(1).nonzero()[:5, 0].tolist()
    common.require(not rows, f"{where}: 'pref' must be 0 (A wins), 1 (B), 2 (tie); rows {rows}: {data['pref'][rows].tolist()}")
    common.require(data["prompt_embeds"].shape[-1] == cfg["transformer"]["text_dim"], f"{where}: prompt_embeds "
            f"{tuple(data['prompt_embeds'].shape)}, the backbone's text width is {cfg['transformer']['text_dim']}")
    data = dataset.drop_repeats(dict(data, pref=data["pref"].long()), "pairs", args.on_duplicates, where)
    common.require((data["pref"] != 2).any(), f"{where}: no pair has a winner ({len(data['pref'])} ties): nothing to learn")
    return data, meta, size


def split_by_prompt(data, test_fraction: float, seed: int = 0):
    """Prompt-disjoint train / test rows (the paper's VLRM-Bench is prompt-disjoint from training)."""
    train_p, test_p = dataset.split_indices(len(data["prompt_embeds"]), test_fraction, seed)
    is_test = torch.isin(data["prompt_idx"], test_p)
    train, test = (~is_test).nonzero()[:, 0], is_test.nonzero()[:, 0]
    common.require(len(train) and len(test), f"the prompt split of {len(train_p) + len(test_p)} prompts left {len(train)} "
            f"train / {len(test)} test pairs: change --test-fraction (or add prompts)", 2)
    return train, test, test_p


def bon_prompt_table(args, pipe, data, meta, test_p):
    """Best-of-N draws: the held-out prompts of the split (+ the toy world's unseen 'patch' prompts), cycled to
    --eval-samples rows (row i: prompt i mod P; each row gets its own N noises in evaluate_bon)."""
    prompts = [meta["prompts"][i] for i in test_p.tolist()]
    embeds, mask = data["prompt_embeds"][test_p], data["prompt_mask"][test_p]
    if meta.get("source") == "toy" and pipe.text_encoder is not None:
        e, m = common.encode_prompts(pipe, unseen := toy.toy_prompts("eval"), max_sequence_length=embeds.shape[1])
        prompts, embeds, mask = unseen + prompts, torch.cat([e, embeds]), torch.cat([m, mask])
    rows = [i % len(prompts) for i in range(len(prompts) if args.eval_samples is None else args.eval_samples)]
    return [prompts[i] for i in rows], embeds[rows], mask[rows]


def sampler_shift(args, pipe) -> float:  # --flow-shift, or the loaded checkpoint's own scheduler shift
    return common.backbone_geometry(pipe)["flow_shift"] if args.flow_shift is None else args.flow_shift


def load_head(path, transformer_config, num_blocks: int, args=None) -> PRISMHead:
    """--reward-ckpt: a PRISM head (its config: the file's metadata) for this backbone's width after block N_b. With
    `args`, the head shape and the loss it recorded must be the arguments' (the ones that differ are named)."""
    common.require(Path(path).is_file(), f"--reward-ckpt {path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        head = PRISMHead(**{k: meta[k] if k == "pooling" else int(meta[k]) for k in HEAD_KEYS})
        head.load_state_dict(state)
        made_for = (head.config["in_dim"], int(meta["num_blocks"]))
    except (SafetensorError, OSError, KeyError, ValueError, AssertionError, RuntimeError) as e:
        raise common.UserError(f"--reward-ckpt {path}: not a PRISM head checkpoint ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]}); train one with --stage rm") from None
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    common.require(made_for == (width, num_blocks), f"--reward-ckpt {path}: a head of width {made_for[0]} after block "
            f"{made_for[1]}; this backbone gives {width} after block {num_blocks} (--num-blocks)")
    asked = {} if args is None else {k: getattr(args, "head_" * (k == "dim") + k) for k in HEAD_KEYS[1:]} | loss_config(args)
    differ = [f"--{'head-dim' if k == 'dim' else k.replace('_', '-')} {meta[k]} (now {v})" for k, v in asked.items()
              if k in meta and meta[k] != str(v)]  # (a file saved before the loss was recorded: its shape only)
    common.require(not differ, f"--reward-ckpt {path} was trained with " + ", ".join(differ) + ": pass the same flags", 2)
    return head


def check_args(args: Args) -> dict:
    """Flag checks beyond parse_args' ranges, --out-dir (its nearest existing folder writable) and --reward-ckpt, before
    anything loads. Returns the backbone's config (common.backbone_config: a folder's own config files)."""
    cfg, run, size = common.backbone_config(args.backbone), not args.estimate_memory, {k: getattr(args, k) for k in SIZE}
    common.require(args.stage != "bon" or args.reward_ckpt, "--stage bon needs --reward-ckpt <run>/prism_head.safetensors", 2)
    common.require(args.device in ("auto", "cpu") or args.device.startswith("cuda") and torch.cuda.is_available(), f"--device "
            f"{args.device}: auto, cpu or cuda[:n] (CUDA available here: {torch.cuda.is_available()})", 2)
    common.require(not run or args.data or args.backbone == "tiny" and all(v in (None, cfg[k]) for k, v in size.items()),
            "the toy world exists for --backbone tiny at its own size only; pass --data <pairs folder> (prepare.py)", 2)
    common.require(not run or args.stage == "rm" or max(args.bon_steps, default=0) <= args.num_steps,
            f"--bon-steps {args.bon_steps} must lie in 1..--num-steps {args.num_steps}", 2)
    common.require(args.head_dim % args.num_heads == 0, f"--head-dim {args.head_dim}: not a multiple of --num-heads "
            f"{args.num_heads}", 2)
    common.require(all(getattr(args, k) is None or getattr(args, k) >= 1 for k in (*SIZE, "max_steps", "eval_samples")),
            "--height, --width, --num-frames, --max-steps and --eval-samples must be >= 1", 2)
    common.require(args.num_blocks <= cfg["transformer"]["num_layers"], f"--num-blocks {args.num_blocks}: {args.backbone} has "
            f"{cfg['transformer']['num_layers']} blocks", 2)
    rundir.check_writable(args.out_dir or "runs") if run else None  # the run folder is made after loading: writable now?
    try:  # the loss checks its own parameters (Rao-Kupper: eta > 1)
        preference_nll(args, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    except ValueError as e:
        raise common.UserError(f"--loss {args.loss}: {e}", 2) from None
    common.geometry(cfg, **size)
    load_head(args.reward_ckpt, cfg["transformer"], args.num_blocks, args) if args.reward_ckpt else None
    return cfg


def estimate_memory(args: Args) -> dict:
    """--estimate-memory: the load phase, head_step on one pair, one scoring pass, one early Best-of-N for one prompt
    (k = 5: its first step on a 2-step schedule, the other no-grad steps counted), fake tensors at the video size."""
    with estimate.StageEstimates("PRISM", args.backbone, args.height, args.width, args.num_frames) as est:
        (x0, emb, mask), _ = est.inputs(), est.load_phase()
        pipe, head = est.build(lambda: (est.pipeline(), new_head(args, est.cfg["transformer"])))
        est.step("head step (pair)", head_step, args, pipe.transformer, head, x0, x0, emb, mask,
                 torch.zeros(1, dtype=torch.long), torch.rand(1), torch.randn_like(x0))  # A = B: only shapes matter
        est.step("scoring pass", torch.no_grad()(prism_reward), pipe.transformer, head, x0, torch.rand(1), emb, mask,
                 args.num_blocks, train=False)
        k, n, cfg = min(5, args.num_steps), args.bon_n, args.guidance_scale > 1
        est.step(f"early Best-of-{n} (k={k} of {args.num_steps})", early_best_of_n, pipe, head,
                 torch.randn(1, n, *x0.shape[1:]), emb, mask, common.sigma_schedule(2, sampler_shift(args, pipe)), 1,
                 args.num_blocks, args.guidance_scale, torch.zeros_like(emb) if cfg else None, train=False,
                 rollout_forwards=(n * (k - 1) + args.num_steps - k - 1) * (1 + cfg))
    return est.results


# ==== main
def main(args: Args) -> dict:
    cfg = check_args(args)  # flags, the backbone's config files, --reward-ckpt, --out-dir
    if args.estimate_memory:
        return estimate_memory(args)
    data, meta, size = read_data(args, cfg)  # --data, checked against the backbone and the size; None: the toy world
    split = split_by_prompt(data, args.test_fraction) if data else None  # (a bad split fails before loading too)
    common.require(args.resume or not args.out_dir or not any(Path(args.out_dir).glob("*")) or "RANK" in os.environ,
                   f"--out-dir {args.out_dir} already holds a run; pass --resume to continue it, or choose another folder", 2)
    rundir.seed_everything(args.seed)
    device = rundir.pick_device(args.device)
    pipe = common.load_backbone(args.backbone, device, common.pick_dtype(args.dtype, device), **size)
    if data is None:  # the toy world, generated by tiny itself (cached)
        data, meta = toy.toy_dataset(pipe, "pairs", args.toy_size, seed=0, cache_dir=args.toy_cache)
    train_idx, test_idx, test_p = split or split_by_prompt(data, args.test_fraction)
    args = dataclasses.replace(args, **{k: common.backbone_geometry(pipe)[k] for k in SIZE})  # args.json: the size
    run = rundir.Run("prism", args, args.out_dir or None, args.resume)
    # every prompt still needed is encoded now; then the text encoder (11 GB for Wan) leaves the device
    prompts, embeds, mask = bon_prompt_table(args, pipe, data, meta, test_p)
    negative = common.encode_prompts(pipe, [""], max_sequence_length=data["prompt_embeds"].shape[1])[0]
    common.drop_text_encoder(pipe)
    head = (load_head(args.reward_ckpt, pipe.transformer.config, args.num_blocks, args) if args.reward_ckpt
            else new_head(args, pipe.transformer.config)).to(device)
    before = [p.clone() for p in pipe.transformer.parameters()] if args.backbone == "tiny" else None
    common.shard(pipe.transformer, head)  # torchrun: FSDP2 of each frozen block (14B fits) and of the head, whole
    ties, head_file, gains = (data["pref"][test_idx] == 2).float().mean().item(), run.dir / "prism_head.safetensors", {}
    summary = dict(method="prism", backbone=args.backbone, run_dir=str(run.dir), train_pairs=len(train_idx),
                   test_pairs=len(test_idx), test_ties=ties, head_params=sum(p.numel() for p in head.parameters()),
                   tie_sweep=args.tie_sweep, flow_shift=sampler_shift(args, pipe), **loss_config(args))
    if args.stage in ("rm", "all"):
        if not args.reward_ckpt:
            summary["train"] = train_head(args, pipe, head, data, train_idx, run, device)
            common.save_safetensors(head.state_dict(), head_file, metadata=dict(
                **head.config, num_blocks=args.num_blocks, **loss_config(args), backbone=args.backbone))
            rundir.plot_metrics(run, "rm", ["loss"], f"PRISM head: training NLL ({args.loss})")  # the PNGs: docs' tables
        rows = summary["accuracy"] = evaluate_accuracy(args, pipe, head, data, test_idx, device)
        summary.update({f"acc_t{r['t']}": r["acc"] for r in rows})  # flat headline numbers
        rundir.plot(run.dir / "accuracy_vs_t.png", {n: ([r["t"] for r in rows], [r.get(k, ties) for r in rows]) for n, k in
                    (("w/o ties", "acc"), ("w/ ties", "acc_ties"), ("always tie, w/ ties", ""))}, "PRISM accuracy vs t", "t")
        print(f"\nPRISM accuracy vs t ({len(test_idx)} held-out pairs; always tie: {ties:.3f} w/ ties; NLL: {args.loss})")
        print(rundir.format_table([{"metric": name, **{str(r["t"]): r[key] for r in rows}} for name, key in
                                   (("w/o ties", "acc"), ("SE", "acc_se"), ("w/ ties", "acc_ties"), ("NLL", "nll"))]))

    if args.stage in ("bon", "all"):
        reward_fn = toy.true_reward if meta.get("source") == "toy" else None  # real data: no ground truth, picks saved
        rows = summary["bon"] = evaluate_bon(args, pipe, head, prompts, embeds, mask, reward_fn, run, device, negative)
        gains = {int(r["method"].split()[-1]): r for r in rows if "gain_vs_random" in r}
        summary.update({f"bon_gain_step{k}": [r["gain_vs_random"], r["gain_se"]] for k, r in gains.items()})
        if gains:
            ks, g, se = list(gains), [r["gain_vs_random"] for r in gains.values()], [r["gain_se"] for r in gains.values()]
            rundir.plot(run.dir / "bon_gain_vs_k.png", {"PRISM pick": (ks, g), "PRISM - 2 SE": (ks, [a - 2 * b for a, b in zip(
                g, se)]), "oracle": (ks, [rows[1]["reward"] - rows[0]["reward"]] * len(ks))}, "gain over a random pick", "k")
        what = "true toy reward of the pick" if reward_fn else "no ground truth on --data (picks saved)"
        print(f"\nEarly Best-of-{args.bon_n}: {what}, {len(prompts)} draws over {len(set(prompts))} prompts, "
              f"{args.num_steps} steps at flow shift {summary['flow_shift']} (per-draw compute; rel_flops vs the oracle)")
        print(rundir.format_table(rows, ["method", "reward", "se", "gain_vs_random", "gain_se", "forwards",
                                         "score_passes", "decodes", "gflop", "rel_flops"]))
    acc = [r for r in summary.get("accuracy", []) if r["t"] <= 699] or summary.get("accuracy", [])  # make demo's claims
    w, k = min(acc, key=lambda r: r["acc"], default=None), 5 if 5 in gains else max(gains, default=0)
    summary["claims"] = ([dict(claim=f"held-out accuracy w/o ties minus chance (0.5), worst of t in {[r['t'] for r in acc]}",
                               mean=w["acc"] - 0.5, se=w["acc_se"])] if w else []) + ([dict(claim=f"early Best-of-"
        f"{args.bon_n} gain over a random pick at k = {k} of {args.num_steps} steps, true toy reward, held-out + unseen "
        "prompts", mean=gains[k]["gain_vs_random"], se=gains[k]["gain_se"])] if k else [])
    if before is not None:  # the backbone is frozen: nothing of it may have moved
        after = common.full_tensors(dict(pipe.transformer.named_parameters())).values()  # (sharded: gathered)
        summary["backbone_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
    run.summary(summary)
    pngs = ", ".join(sorted(p.name for p in run.dir.glob("*.png")))
    print(f"\nrun folder: {run.dir} (plots: {pngs})\nPRISM head: {args.reward_ckpt or head_file} (--reward-ckpt; in Python: "
          f"prism.load_head(path, pipe.transformer.config, {args.num_blocks}))" + (f"\nBest-of-N picks (latents per k; "
          f"videos: common.decode_latents): {run.dir / 'bon_picks.safetensors'}" if "bon" in summary else ""))
    return summary


if __name__ == "__main__":
    rundir.cli(main, Args, TINY)
