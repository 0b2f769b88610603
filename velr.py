"""VELR: Efficient Video Reward Feedback via Ensemble Latent Reward Models (anonymous ICLR submission; docs/velr.md).
1. N LRMs (3D res-convs, cross-attention to the prompt's last text token, transformer encoder) regress a pixel RM's
score of the decoded video from the clean latent (Huber); their aggregate is the reward, their variance the uncertainty.
2. ReFL: no-grad rollout to a random mid step, K steps with gradient, loss -R_l(z0, c) + beta KL(current || initial);
no VAE, no pixel RM in the graph. 3. Online alignment: every --align-every updates a Huber re-fit on a variance-ranked
replay buffer. `--reward pixel`: RGB ReFL. Equation -> code: Eq. (4) ResBlock3D; (5) LatentRewardModel.cross_attn;
(6) huber_loss; (7) aggregate, ensemble_var; (8) velr_loss, kl_velocity; Sec. 4.3 truncated_mid_step, ReplayBuffer,
align_lrm; Alg. 1 fit_members, pretrain_lrm, tune_step, finetune; Table 3 table3."""
import contextlib, dataclasses, importlib, json, math, os, types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.checkpoint import checkpoint

import common, dataset, estimate, rundir, toy
from common import UserError, arg


@dataclass
class Args:
    # generic
    stage: str = arg("all", "rm: train the LRMs; tune: fine-tune with them; all: both", choices=["rm", "tune", "all"])
    reward: str = arg("latent", "latent: VELR; pixel: RGB ReFL (decode + R in the graph)", choices=["latent", "pixel"])
    compare: list = arg(None, "extra runs, same draws: pixel (RGB ReFL), no-align (VELR without online alignment)",
                        factory=list, choices=["pixel", "no-align"])
    reward_ckpt: str = arg("", "lrm.safetensors of a --stage rm run (--stage tune needs one; --ensemble-size, --lrm-*)")
    out_dir: str = arg("", "run folder (default: a new runs/velr-<backbone>-<time>); an existing one needs --resume")
    resume: bool = arg(False, "continue the run in --out-dir from its checkpoints (the same arguments)")
    checkpoint_every: int = arg(100, "save a checkpoint of the stage every N optimiser steps (and at its end)", min=1)
    seed: int = arg(0, "random seed", min=0)
    device: str = arg("auto", "cuda / cpu / auto", choices=["auto", "cpu", "cuda"])
    dtype: str = arg(None, "DiT dtype (default: bf16 on CUDA, else fp32)", type=str, choices=["bf16", "fp32"])
    max_steps: int = arg(None, "stop each stage at this step (a smoke run: 2; --resume goes on)", type=int, min=1)
    save_videos: int = arg(2, "mp4 samples written into <run>/videos/ before and after each fine-tuning run", min=0)
    estimate_memory: bool = arg(False, "only print each stage step's peak GPU memory and TFLOPs at the video size")
    # backbone and data
    backbone: str = arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder")
    height: int = arg(None, "video height (default: --data's meta.json, else the backbone's)", type=int, min=1)
    width: int = arg(None, "video width (default: --data's meta.json, else the backbone's)", type=int, min=1)
    num_frames: int = arg(None, "video frames, 4k+1 (default: --data's, else the backbone's)", type=int, min=1)
    data: str = arg("", "prepared 'score' dataset folder (prepare.py); default: the toy world")
    relabel: bool = arg(False, "replace --data's scores by --teacher's (default: its scores are the targets)")
    on_duplicates: str = arg("fail", "--data rows of one latent and prompt: fail, or drop", choices=["fail", "drop"])
    toy_size: int = arg(4096, "toy-world dataset rows (en-10 test PCC: 0.41 at 1024, 0.57 at 2048, 0.73)", min=2)
    toy_cache: str = arg("runs/toy_data", "where the toy dataset is cached")
    test_fraction: float = arg(0.2, "held-out share of rows (LRM test), of --data's prompts (evaluation)", min=0, max=1)
    prompts: str = arg("", "fine-tuning prompts, a .txt file with one per line (default: the dataset's prompts)")
    eval_prompts: str = arg("", "evaluation prompts, .txt (default: 12 held-out toy ones; --data: see --test-fraction)")
    eval_samples: int = arg(24, "fresh samples per evaluation, in total, over the prompts in order (ours)", min=1)
    guidance_scale: float = arg(5.0, "CFG of evaluation sampling, negative: the empty prompt (Wan's; <= 1: off)", min=0)
    teacher: str = arg("toy", "pixel RM R: toy | pickscore (frame mean) | module:function f(video, prompts) -> [B]")
    pickscore_model: str = arg("yuvalkirstain/PickScore_v1", "PickScore checkpoint (hub id or folder)")
    # reward model (Sec. 4.1-4.2, App. C.1)
    ensemble_size: int = arg(10, "number of independently initialised LRMs (Sec. 4.2)", min=1)
    aggregate: str = arg("mean", "Eq. (7) over the members (lcb = mean - std)", choices=["mean", "min", "max", "lcb"])
    lrm_dim: int = arg(512, "LRM feature width d_v (~0.02B params per LRM at Wan scale, App. C.9)", min=4)
    lrm_heads: int = arg(8, "attention heads of the LRM's cross-attention and encoder", min=1)
    lrm_layers: int = arg(1, "transformer-encoder layers after the cross-attention (ours)", min=1)
    huber_delta: float = arg(1.0, "delta of the Huber loss, Eq. (6) (not given in the paper; ours)", gt=0)
    rm_lr: float = arg(2e-5, "LRM pretraining learning rate (App. C.1, Wan)", gt=0)
    rm_batch: int = arg(4, "LRM batch size, pretraining and alignment (App. C.1)", min=1)
    rm_epochs: int = arg(3, "LRM pretraining epochs (App. C.1)", min=1)
    grad_accum: int = arg(1, "micro-batches per optimiser step, every stage (App. C.1 uses none)", min=1)
    # fine-tuning (Sec. 4.3, Alg. 1, App. C.2)
    tune_steps: int = arg(1000, "generator updates (not given in the paper; ours)", min=1)
    batch_size: int = arg(4, "prompts per update (App. C.2)", min=1)
    lr: float = arg(1e-5, "LoRA learning rate (App. C.2, Wan)", gt=0)
    lora_rank: int = arg(256, "LoRA rank, alpha = rank (App. C.3)", min=1)
    beta: float = arg(10.0, "weight of the KL term in Eq. (8) (App. C.2)", min=0)
    num_steps: int = arg(50, "sampling steps, training rollout and evaluation (Sec. 5.6)", min=1)
    mid_step: list = arg(None, "range [a, b] of the step where gradients start (App. C.8)", factory=lambda: [15, 25])
    truncated_steps: int = arg(10, "K, denoising steps with gradient (App. C.2)", min=1)
    grad_clip: float = arg(1.0, "gradient-norm clip of the LoRA update (ours)", gt=0)
    gradient_checkpointing: bool = arg(True, "block gradient checkpointing in the DiT's K gradient steps (App. C.3)")
    window_checkpointing: str = arg("step", "the first K-1 gradient steps keep for the backward: only their input "
                                    "(step: a forward more), or all on the CPU (offload), or the GPU (none); ours",
                                    choices=["step", "offload", "none"])
    # online alignment (Sec. 4.3, App. C.2)
    buffer_size: int = arg(256, "replay-buffer size (App. C.2)", min=1)
    align_every: int = arg(10, "re-align the LRMs every this many updates (App. C.2 '10 epochs', docs/velr.md)", min=1)
    align_rounds: int = arg(2, "alignment rounds each time (App. C.2); a round = buffer_size samples (ours)", min=1)
    align_lr: float = arg(1e-5, "LRM learning rate during alignment (App. C.2)", gt=0)


TINY = dict(num_steps=10, mid_step=[3, 5], truncated_steps=2, lrm_dim=32, rm_lr=2e-3, rm_batch=32, rm_epochs=8,
            align_lr=1e-3, buffer_size=64, align_every=4, tune_steps=60, lr=2e-3, lora_rank=8, beta=0.1,
            toy_size=2048, eval_samples=384, guidance_scale=1.0, checkpoint_every=50)


# ==== Latent reward model (Sec. 4.1) and the ensemble (Sec. 4.2)
class ResBlock3D(nn.Module):
    """Eq. (4): H = SiLU(GN(W2 * SiLU(GN(W1 * H))) + D(H)); W1 and the 1x1x1 shortcut D downsample."""

    def __init__(self, cin: int, cout: int, stride: tuple):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv3d(cin, cout, 3, stride, 1), nn.GroupNorm(math.gcd(8, cout), cout)
        self.conv2, self.norm2 = nn.Conv3d(cout, cout, 3, 1, 1), nn.GroupNorm(math.gcd(8, cout), cout)
        self.down = nn.Conv3d(cin, cout, 1, stride)

    def forward(self, h):
        return F.silu(self.norm2(self.conv2(F.silu(self.norm1(self.conv1(h))))) + self.down(h))


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
        # (ours) standardised over the training prompts: T5 ends in an RMS norm, its last tokens share a large part
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
        # Eq. (5), video tokens query the text token: one key, weight 1, a prompt vector added to every token
        tokens = tokens + self.cross_attn(self.norm_q(tokens), p, p, need_weights=False)[0]
        return self.head(self.encoder(tokens).mean(1)).squeeze(-1)


class EnsembleLRM(nn.Module):
    """N independently initialised LRMs (Sec. 4.2); forward returns every member's reward, [N, B]."""

    def __init__(self, n: int, latent_shape, text_dim: int, dim: int, heads: int, layers: int, seed: int = 0):
        super().__init__()
        self.config = dict(n=n, latent_shape=list(latent_shape), text_dim=text_dim, dim=dim, heads=heads, layers=layers)
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


def ensemble_var(preds):
    """sigma^2 over the members of [N, B] (Sec. 4.2), the buffer's uncertainty; one member: 0, not NaN."""
    return preds.var(0) if len(preds) > 1 else torch.zeros_like(preds[0])


def aggregate(p, how: str = "mean", k: float = 1.0):
    """Eq. (7): R_l = Agg over the members of [N, B], the one place the ensemble becomes a reward; lcb: mean - k std."""
    return dict(mean=p.mean(0), min=p.amin(0), max=p.amax(0), lcb=p.mean(0) - k * ensemble_var(p).sqrt())[how]


def last_text_token(embeds, mask):
    """Z^c_{d_t,:}: each prompt's last non-padding token (T5's end-of-sequence), [P, D] (Sec. 4.1)."""
    return embeds[torch.arange(len(embeds)), mask.long().sum(1).clamp(min=1) - 1]


def load_lrm(path, args, latent_shape=None, weights: bool = True):
    """A --stage rm checkpoint: its ensemble, or (weights=False) its config, which must be the flags' and latents'."""
    try:
        with safe_open(str(path), "pt") as f:
            cfg, state = json.loads((f.metadata() or {})["config"]), weights and {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a --stage rm run's lrm.safetensors ({type(e).__name__}: {e})") from None
    want = dict(n=("--ensemble-size", args.ensemble_size), **{k: (f"--lrm-{k}", getattr(args, f"lrm_{k}")) for k in
                ("dim", "heads", "layers")}, latent_shape=("latents", list(latent_shape or [])))
    differ = [f"{f} {v} (its metadata: {cfg.get(k)})" for k, (f, v) in want.items() if v and v != cfg.get(k)]
    common.require(not differ, f"--reward-ckpt {path} is another ensemble: {', '.join(differ)}", 2)
    if not weights:
        return cfg
    lrm = EnsembleLRM(**cfg)
    lrm.load_state_dict(state)
    return lrm.eval().requires_grad_(False)


def pickscore_reward(model, tokenize, video, prompts):
    """PickScore (a CLIP image reward) averaged over frames; differentiable in the video [B,3,F,H,W]."""
    (B, _, Fr, H, W), size = video.shape, model.config.vision_config.image_size
    frames = (video.transpose(1, 2).flatten(0, 1) + 1) / 2                 # [B*F, 3, H, W] in [0, 1]
    h, w = max(size, round(H * size / min(H, W))), max(size, round(W * size / min(H, W)))
    frames = F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False)  # short side -> size
    frames = frames[:, :, (h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]  # centre
    mean, std = (torch.tensor(v, device=video.device).view(1, 3, 1, 1) for v in  # CLIP's normalisation
                 ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))
    features = lambda out: getattr(out, "pooler_output", out)  # transformers 5 returns an output object
    img = F.normalize(features(model.get_image_features(pixel_values=(frames - mean) / std)), dim=-1)
    with torch.no_grad():
        txt = F.normalize(features(model.get_text_features(**tokenize(prompts))), dim=-1)
    return (model.logit_scale.exp() * (img.view(B, Fr, -1) * txt[:, None]).sum(-1)).mean(1)


def load_teacher(args, device):  # the pixel reward model R(video, prompts) -> [B] that the LRMs regress (Sec. 4.1)
    module, _, name = ("toy:toy_reward" if args.teacher == "toy" else args.teacher).partition(":")
    try:
        if args.teacher == "pickscore":
            from transformers import AutoProcessor, CLIPModel
            model = CLIPModel.from_pretrained(args.pickscore_model).eval().requires_grad_(False).to(device)
            tok = AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").tokenizer  # PickScore's
            tokenize = lambda p: tok(p, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            return lambda video, prompts: pickscore_reward(model, tokenize, video, prompts)
        fn = getattr(importlib.import_module(module), name, None) if name else None
    except (ImportError, OSError) as e:  # a module that is not there, a checkpoint that is not one or not reachable
        raise UserError(f"--teacher {args.teacher}: cannot import '{module}' ({e})" if name else
                        f"--pickscore-model {args.pickscore_model}: cannot load it ({e})", 2) from None
    common.require(callable(fn), f"--teacher {args.teacher}: " + (
        f"module '{module}' has no function '{name}'" if name else "use toy, pickscore or module:function"), 2)
    return fn


@torch.no_grad()
def pixel_reward(pipe, teacher, latents, prompts, batch_size: int = 8):
    """R(Dec(z), c) without gradient: labels for the LRM, and the ground truth in the toy world."""
    r = torch.cat([teacher(common.decode_latents(pipe, latents[i:i + batch_size].to(pipe.vae.device)),
                           prompts[i:i + batch_size]).float().cpu() for i in range(0, len(latents), batch_size)])
    common.require(torch.isfinite(r).all(), f"--teacher: {getattr(teacher, '__name__', teacher)} returned NaN/inf")
    return r


# ==== Losses (Eq. 6, 8), the truncated mid-step rollout (Sec. 4.3) and the replay buffer of online alignment
def huber_loss(pred, target, delta: float = 1.0):
    """Eq. (6): 1/2 d^2 if |d| <= delta else delta (|d| - delta/2), d = R(Dec(z), c) - R_l(z, c); batch mean."""
    return F.huber_loss(pred, target, delta=delta)


def kl_velocity(transformer, x, sigma, embeds):
    """Alg. 1's KL[pi || pi_old] (see docs/velr.md): mean |v(x) - v_init(x)|^2 at the window's last state x, held fixed
    (detached): its gradient reaches the LoRA only through v; v_init with the adapters off (no weight copy)."""
    x = x.detach()
    with torch.no_grad():
        transformer.disable_adapters()
        v_ref = common.predict_velocity(transformer, x, sigma, embeds)
        transformer.enable_adapters()
    return ((common.predict_velocity(transformer, x, sigma, embeds) - v_ref) ** 2).mean()


def velr_loss(reward, kl, beta: float):
    """Eq. (8): L = -E[R_l(z0, c) - beta KL]."""
    return -(reward.mean() - beta * kl)


def truncated_mid_step(transformer, noise, embeds, sigmas, start: int, K: int, keep: str = "step"):
    """No-grad rollout to `start`, K steps with gradient, z0 from the last velocity; returns z0 and the K-th input.
    keep (--window-checkpointing): what each of the first K - 1 steps keeps for the backward: its input alone (step:
    its forward runs again, non-reentrant checkpoint), its tensors in CPU memory (offload), or on the GPU (none)."""
    x, _ = common.rollout(transformer, noise, embeds, sigmas, 0, start)  # no grad_steps: no graph, no activations
    last, v = start + K - 1, lambda x, i: common.predict_velocity(transformer, x, sigmas[i], embeds)
    step = lambda x, i: common.euler_step(x, v(x, i), sigmas[i], sigmas[i + 1])  # a step of the window
    for i in range(start, last):
        with torch.autograd.graph.save_on_cpu(x.is_cuda) if keep == "offload" else contextlib.nullcontext():
            x = checkpoint(step, x, i, use_reentrant=False) if keep == "step" else step(x, i)
    return common.x0_from_velocity(x, common.predict_velocity(transformer, x, sigmas[last], embeds), sigmas[last]), x


class ReplayBuffer:
    """B = {(z, prompt, R, sigma^2)}: the `size` highest-variance samples so far (App. C.2); fixed size, empty: -inf"""

    def __init__(self, size: int, shape=(1,), dtype=torch.float32):
        self.tensors = dict(z=torch.zeros(size, *shape, dtype=dtype), prompt_idx=torch.zeros(size, dtype=torch.long),
                            reward=torch.zeros(size), var=torch.full((size,), -math.inf))
        self.z, self.prompt_idx, self.reward, self.var = self.tensors.values()

    def add(self, *new):  # (z, prompt_idx, reward, var) of a batch
        new = [torch.cat([x.detach().cpu().to(t.dtype), t]) for t, x in zip(self.tensors.values(), new)]
        keep = new[3].argsort(descending=True, stable=True)[:len(self.var)]  # the lowest variances go; a tie: the new
        for a, b in zip(self.tensors.values(), new):
            a.copy_(b[keep])

    def sample(self, n: int, generator=None):  # indices of stored samples drawn with probability ~ sigma^2 (Sec. 4.3)
        return torch.multinomial((self.var > -math.inf) * self.var.clamp(min=1e-12), n, True, generator=generator)


# ==== Stage 1: pretrain the ensemble (Sec. 4.1, App. C.1); Table 3 in miniature
def lrm_step(args, lrm, i: int, z, text, target) -> float:
    """Forward and backward of Eq. (6) for member i on one micro-batch (fit_members, --estimate-memory)."""
    loss = huber_loss(lrm.members[i](z, text), target, args.huber_delta)
    (loss / args.grad_accum).backward()
    return loss.item()


def fit_members(lrm, opt, z, text, target, steps, args, draw):
    """Huber regression (Eq. 6) of each member on its own batches, draw(n, call) -> indices (independent: AdamW is
    per tensor); yields (step, loss) over `steps`. torchrun: each rank its share of every batch, the loss gathered."""
    lrm.train().requires_grad_(True)
    for step in steps:
        total, n, dev = 0.0, len(lrm.members), lrm.members[0].head[1].weight.device
        for i in range(n):
            for j in range(args.grad_accum):
                idx = common.local_batch(draw(args.rm_batch, (step * n + i) * args.grad_accum + j))
                loss = lrm_step(args, lrm, i, z[idx].to(dev), text[idx].to(dev), target[idx].to(dev))
                total += common.gather(torch.tensor([loss], device=dev)).mean().item() / n / args.grad_accum
            opt.step()
            opt.zero_grad(set_to_none=True)  # no grad left behind (finetune's next LoRA step would apply it)
        yield step, total
    lrm.eval().requires_grad_(False)


@torch.no_grad()
def predict(lrm, z, text, batch_size: int = 256):  # [N, B] on the CPU; z: a tensor, or dataset.Rows read in chunks
    dev = lrm.members[0].head[1].weight.device
    return torch.cat([lrm(z[i:i + batch_size].to(dev), text[i:i + batch_size].to(dev)).cpu()
                      for i in range(0, len(z), batch_size)], 1)


def table3(p_train, y_train, p_test, y_test, agg=aggregate, sizes=(1, 3, 5, 10)) -> list[dict]:
    """Eq. (7) over k members, metrics averaged over disjoint groups of k (k = 1: the expected single LRM)."""
    metrics = lambda p, y: dict(MSE=((p - y) ** 2).mean().item(), PCC=torch.corrcoef(torch.stack([p, y]))[0, 1].item())
    rows, n = [], len(p_train)
    for k in sorted(k for k in {*sizes, n} if k <= n):
        groups, row = [list(range(i, i + k)) for i in range(0, n - k + 1, k)], {"LRM": f"en-{k}"}
        for split, p, y in (("train", p_train, y_train), ("test", p_test, y_test)):
            for key in ("MSE", "PCC"):
                row[f"{split} {key}"] = sum(metrics(agg(p[g]), y)[key] for g in groups) / len(groups)
        rows.append(dict(row, groups=len(groups)))
    return rows


def pretrain_lrm(args, data, text_tokens, latent_shape, device, run):
    """Offline Huber pretraining of every member (Alg. 1, first loop; stage 'rm'); returns the ensemble, Table 3."""
    train, test = dataset.split_indices(len(data["score"]), args.test_fraction, args.seed)
    part = lambda v, rows: v.subset(rows) if isinstance(v, dataset.Rows) else v[rows]  # lazy latents: nothing read
    z, y, text = data["latents"], data["score"].float(), text_tokens[data["prompt_idx"]]
    lrm = EnsembleLRM(args.ensemble_size, latent_shape, text_tokens.shape[1], args.lrm_dim, args.lrm_heads,
                      args.lrm_layers, seed=args.seed).to(device)
    lrm.set_text_statistics(text_tokens.to(device))
    common.shard(types.SimpleNamespace(blocks=()), *lrm.members)  # torchrun: FSDP2, each member whole (fit_members)
    # foreach: a CPU's default AdamW loops over the tensors; the same numbers, ~2x faster
    opt = torch.optim.AdamW(lrm.parameters(), lr=args.rm_lr, weight_decay=1e-4, foreach=True)
    steps = run.steps("rm", args.rm_epochs * max(1, len(train) // (args.rm_batch * args.grad_accum)), dict(lrm=lrm),
                      opt, every=args.checkpoint_every, stop_at=args.max_steps, desc="pretrain LRMs")
    for step, loss in fit_members(lrm, opt, part(z, train), text[train], y[train], steps, args,
                                  lambda n, call: dataset.batch_rows(call, len(train), n, args.seed)):
        run.log(step, "rm", huber=loss)
        run.resume = False  # it trained on: a later stage's checkpoint is stale, that stage starts afresh
    return lrm, table3(predict(lrm, part(z, train), text[train]), y[train], predict(lrm, part(z, test), text[test]),
                       y[test], lambda p: aggregate(p, args.aggregate))


def align_lrm(lrm, opt, buffer: ReplayBuffer, text_tokens, args, generator) -> float:
    """Online alignment (Alg. 1, else-branch): Huber re-fit on buffer samples drawn by variance, then re-scored."""
    full, z, text = buffer.var > -math.inf, buffer.z, text_tokens[buffer.prompt_idx]
    *_, (_, loss) = fit_members(lrm, opt, z, text, buffer.reward, range(args.align_rounds * max(1, args.buffer_size //
        (args.rm_batch * args.grad_accum))), args, lambda n, _: buffer.sample(n, generator))  # by variance: no loader
    buffer.var[full] = ensemble_var(predict(lrm, z[full], text[full])).cpu()
    return loss


# ==== Stage 2: fine-tune the generator (Sec. 4.3, Alg. 1), or the RGB ReFL baseline (--reward pixel)
def tune_step(args, pipe, lrm, noise, embeds, text, sigmas, start: int, K: int, teacher=None, names=None):
    """Forward + backward of one micro-batch of Alg. 1's update (finetune, --estimate-memory): R_l = Eq. (7) of the
    frozen ensemble on z0, or given a teacher RGB ReFL's R(Dec(z0), c); Eq. (8), divided over --grad-accum."""
    z0, x = truncated_mid_step(pipe.transformer, noise, embeds, sigmas, start, K, args.window_checkpointing)
    preds = lrm(z0, text) if teacher is None else None  # [N, B]: the members' rewards
    reward = aggregate(preds, args.aggregate) if teacher is None else teacher(common.decode_latents(pipe, z0), names)
    kl = kl_velocity(pipe.transformer, x, sigmas[start + K - 1], embeds)
    loss = velr_loss(reward, kl, args.beta)
    (loss / args.grad_accum).backward()
    return dict(z0=z0.detach(), preds=preds if preds is None else preds.detach(), reward=reward.detach(),
                kl=kl.detach(), loss=loss.detach())


def finetune(args, pipe, lrm, teacher, prompts, embeds, text_tokens, mode: str, align: bool, run, name: str):
    """Alg. 1 on a fresh LoRA `name` (stage 'tune-<name>'): 'latent' = VELR (aligning if `align`), 'pixel' = RGB ReFL;
    all runs share prompts, noise, starts (one stream), LoRA init. Checkpoint: LoRA, AdamW, streams, buffer, LRMs."""
    tr, dev, _ = pipe.transformer, pipe.transformer.device, torch.manual_seed(args.seed)  # LoRA init: as in every run
    params = common.add_lora(tr, args.lora_rank, args.lora_rank, adapter_name=name)  # (and makes it the active one)
    common.shard(tr)  # torchrun: FSDP2 per block, LoRA included (it replaces the parameters); the LRMs: already
    params = [p for p in tr.parameters() if p.requires_grad] if common.rank_world()[1] > 1 else params
    glob = lambda t: common.gather((t if t.dim() else t[None]).to(dev)).cpu()  # all ranks' values (NCCL: on GPU)
    opt = torch.optim.AdamW([dict(params=params, lr=args.lr, weight_decay=0.0)] + ([dict(  # moves what has grads
        params=list(lrm.parameters()), lr=args.align_lr, weight_decay=1e-4)] if align else []), foreach=True)
    geo = common.backbone_geometry(pipe)  # the latent shape, and the schedule's shift (the checkpoint's)
    shape, sigmas = geo["latent_shape"], common.sigma_schedule(args.num_steps, geo["flow_shift"])
    buffer, g, g_align = ReplayBuffer(args.buffer_size, shape, tr.dtype), torch.Generator(), torch.Generator()
    state = dict(buffer.tensors, **{f"lrm.{k}": v for k, v in lrm.state_dict().items()}) if align else {}
    timer = rundir.StepTimer(dev)
    for step in run.steps(f"tune-{name}", args.tune_steps, dict(lora=tr), opt, tensors=state, stop_at=args.max_steps,
                          generators=dict(data=g.manual_seed(args.seed + 1), align=g_align.manual_seed(args.seed + 2)),
                          every=args.checkpoint_every, desc=f"fine-tune {name}"):  # g_align: g's draws the same in all
        batches, rows = [], []
        with timer:  # the generator update only: what latent vs pixel reward changes
            for _ in range(args.grad_accum):
                idx = torch.randint(0, len(prompts), (args.batch_size,), generator=g)  # prompts, not dataset rows:
                noise = torch.randn((args.batch_size, *shape), generator=g)  # the global batch, then this rank's share
                idx, noise = common.local_batch(idx), common.local_batch(noise).to(dev)
                start = int(torch.randint(args.mid_step[0], args.mid_step[1] + 1, (1,), generator=g))
                names, text = [prompts[i] for i in idx], text_tokens[idx].to(dev) if mode == "latent" else None
                b = tune_step(args, pipe, lrm, noise, embeds[idx].to(dev), text, sigmas, start, args.truncated_steps,
                              teacher if mode == "pixel" else None, names)
                common.require(torch.isfinite(b["loss"]), f"fine-tune {name} step {step}: loss {b['loss'].item()} (kl "
                        f"{b['kl'].item()}); lower --lr ({args.lr}) or check the reward model")
                batches.append(dict(b, idx=idx, names=names, start=start))
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for b in batches:  # VELR: each micro-batch's pixel reward (no gradient), the buffer's labels
            rows.append(dict({k: glob(b[k]).mean().item() for k in ("loss", "reward", "kl")}, start=b["start"]))
            if mode == "latent":  # the buffer holds every rank's samples
                r_pix, var = glob(pixel_reward(pipe, teacher, b["z0"], b["names"])), glob(ensemble_var(b["preds"]))
                rows[-1].update(pixel_reward=r_pix.mean().item(), variance=var.mean().item(),
                                gap=(glob(b["reward"]) - r_pix).abs().mean().item())
                if align:
                    buffer.add(glob(b["z0"]), glob(b["idx"]), r_pix, var)
        row = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}  # the step: its micro-batches' mean
        if align and (step + 1) % args.align_every == 0:
            row["align_huber"] = align_lrm(lrm, opt, buffer, text_tokens, args, g_align)
        run.log(step, f"tune-{name}", **row)
    common.save_lora(tr, run.dir / f"lora-{name}", name)
    log = run.read_metrics(f"tune-{name}")  # with the steps before a --resume
    q = max(1, len(log) // 4)  # |R_l - R| on the training batches, first and last quarter of the updates
    gap = [sum(r["gap"] for r in part) / q for part in (log[:q], log[-q:])] if "gap" in log[0] else None
    return dict(seconds_per_step=timer.seconds_per_step, peak_memory_gib=timer.peak_memory_gib(), gap_first_last=gap)


@torch.no_grad()
def evaluate(pipe, teacher, prompts, embeds, n: int, num_steps: int, guidance_scale: float = 1.0, negative=None):
    """Pixel reward (the toy truth) of n fresh samples, seed 10^6 + i, prompt i * P // n; CFG > 1 with `negative`."""
    which, mine, dev = torch.arange(n) * len(prompts) // n, common.local_batch(torch.arange(n)), pipe.transformer.device
    z = common.sample_latents(pipe, embeds[which[mine]], [10**6 + i for i in mine.tolist()], num_steps=num_steps,
                              guidance_scale=guidance_scale, negative_embeds=negative if guidance_scale > 1 else None)
    r = pixel_reward(pipe, teacher, z, [prompts[i] for i in which[mine]])  # torchrun: each rank its share, gathered
    return common.gather(r.to(dev)).cpu(), common.gather(z.to(dev)).cpu(), which


# ==== Flags, files and data, all checked before any model loads (#19); --estimate-memory; main
def check_inputs(args: Args) -> tuple:  # flags, video size, data, prompts, --reward-ckpt, --out-dir; nothing loads
    def read_prompts(path, flag: str) -> list[str]:
        common.require(Path(path).is_file(), f"{flag} {path}: no such file (a UTF-8 .txt, one prompt per line)")
        p = [s.strip() for s in Path(path).read_bytes().decode(errors="replace").splitlines() if s.strip()]
        common.require(p and "\ufffd" not in "".join(p), f"{flag} {path}: no prompts in it, or not UTF-8 text")
        return p

    (a, b), mid = (list(args.mid_step) + [-1, -1])[:2], " ".join(map(str, args.mid_step))
    common.require(len(args.mid_step) == 2 and 0 <= a <= b <= args.num_steps - args.truncated_steps, f"--mid-step "
                   f"{mid} with K={args.truncated_steps} does not fit {args.num_steps} steps (need a <= b <= N - K)", 2)
    common.require(int(os.environ.get("WORLD_SIZE", 1)) == 1 or not args.compare, "--compare under torchrun: run "
                   "each fine-tuning on its own (--reward pixel; the sharded LoRA is made once)", 2)
    common.require(args.lrm_dim % args.lrm_heads == 0, f"--lrm-dim {args.lrm_dim}: not a multiple of --lrm-heads", 2)
    common.require(args.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device here", 2)
    common.require(args.data or args.estimate_memory or args.backbone == "tiny", f"--backbone {args.backbone}: the "
                   "toy world exists only for tiny; pass --data <dataset folder> (prepare.py)", 2)
    hub = args.backbone.count("/") == 1 and not Path(args.backbone).expanduser().exists()
    cfg = None if hub and all(args.backbone != c["repo"] for c in common.WAN_CONFIGS.values()) else \
        common.backbone_config(args.backbone)
    data, meta = dataset.load(args.data, "score", lazy=True) if args.data and not args.estimate_memory else (None, {})
    size = dataset.video_size(meta, args.data, height=args.height, width=args.width, num_frames=args.num_frames)
    common.require(args.data or args.estimate_memory or all(size[k] in (None, cfg[k]) for k in size), "--height / "
                   f"--width / --num-frames need --data (the toy world is {'x'.join(str(cfg[k]) for k in size)})", 2)
    vars(args).update(size)
    geo = cfg and common.geometry(cfg, *size.values())  # the size checked against the backbone, no weights
    if args.estimate_memory:
        return None, None, None, None
    rundir.check_writable(args.out_dir or "runs")
    if data:  # geo: the size's shape, and VAE scale (a hub id's: in main, with the weights)
        _ = geo and dataset.check_latents(data, geo, args.data, keys=("latents",))
        data = dataset.drop_repeats(data, "score", args.on_duplicates, args.data)
        common.require(args.relabel or len(set(data["score"].tolist())) > 1, f"{args.data}: every score is the same")
    prompts = read_prompts(args.prompts, "--prompts") if args.prompts else meta.get("prompts") or toy.toy_prompts()
    eval_prompts = (read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else
                    None if args.data else toy.toy_prompts("eval"))
    for n, what, where in ((len(data["score"]) if data else args.toy_size, "rows", args.data or "--toy-size"),
                           (len(prompts), "prompts", args.prompts or args.data)):  # the held-out share: at least one
        common.require(n - max(1, round(n * args.test_fraction)) > 0 or what == "prompts" and eval_prompts,
                       f"{where}: {n} {what}, too few to hold out --test-fraction {args.test_fraction} and train on")
    keep, held = (i.sort().values for i in dataset.split_indices(len(prompts), args.test_fraction, args.seed))
    keep, eval_prompts = (range(len(prompts)), eval_prompts) if eval_prompts else (keep, [prompts[i] for i in held])
    words = [set(p.lower().split()) for p in {*prompts, *eval_prompts, *(meta.get("prompts", []) * args.relabel)}]
    toy_ok = all(w & toy.TOY_COLOURS.keys() and w & toy.TOY_DIRECTIONS.keys() for w in words)  # a colour, a direction
    common.require(toy_ok or args.teacher != "toy" or args.stage == "rm" and not args.relabel, "--teacher toy scores "
                   "toy-world prompts only: pass --teacher pickscore or module:function", 2)
    common.require(args.reward_ckpt or args.stage != "tune" or args.reward == "pixel" and "no-align" not in
                   args.compare, "--stage tune needs --reward-ckpt (a --stage rm run's lrm.safetensors)", 2)
    _ = args.reward_ckpt and load_lrm(args.reward_ckpt, args, geo and geo["latent_shape"], weights=False)  # metadata
    out = Path(args.out_dir) if args.out_dir else None  # rundir.Run's rule, here before anything loads
    common.require(bool(out and out.is_dir() and any(out.iterdir())) == args.resume, f"--out-dir {out} " + (
        "holds no run to --resume" if args.resume else "already holds a run: --resume it, or choose another folder"), 2)
    return data and (data, meta), prompts, keep, eval_prompts


def estimate_memory(args) -> dict:  # the load phase, then the real lrm_step and tune_step on fake tensors, batch 1
    with estimate.StageEstimates("VELR", args.backbone, args.height, args.width, args.num_frames) as est:
        (x0, embeds, mask), K, _ = est.inputs(), args.truncated_steps, est.load_phase()
        text, sigmas = last_text_token(embeds, mask), common.sigma_schedule(args.num_steps, est.cfg["flow_shift"])
        new_lrm = lambda: EnsembleLRM(args.ensemble_size, x0.shape[1:], text.shape[1], args.lrm_dim, args.lrm_heads,
                                      args.lrm_layers)
        est.step(f"LRM step ({args.ensemble_size} members in turn)", lambda lrm, z, t: [lrm_step(  # (all grads kept)
            args, lrm, i, z, t, torch.zeros(len(z))) for i in range(len(lrm.members))], est.build(lambda: (
            est.pipeline(), new_lrm()))[1], x0, text)
        pipe, lrm = est.build(lambda: (est.pipeline(args.lora_rank, args.gradient_checkpointing),
                                       new_lrm().requires_grad_(False)))  # pretrain_lrm: the DiT is on the GPU
        run = lambda k, keep, *teacher: est.step("", tune_step, dataclasses.replace(args, window_checkpointing=keep),
                                                 pipe, lrm, x0, embeds, text, sigmas, 0, k, *teacher, quiet=True,
                                                 rollout_forwards=sum(args.mid_step) / 2)  # E[start] no-grad
        lo, hi = run(1, "none"), {m: run(2, m) for m in ("none", "step")}  # K = 1, 2 (K = 1: no window step)
        cost = estimate.window_checkpointing_costs(lo, lo, hi, K)  # offload: arithmetic (fake tensors cannot move)
        what = dict(step=f"+ {cost['step'][1] / 1e12:.0f} TFLOPs recomputed",
                    offload=f"{cost['offload'][1] / common.GiB:.1f} GiB in CPU memory, moved there and back", none="")
        for keep in sorted(what, key=lambda m: m != args.window_checkpointing):  # the flag's first
            est.report(f"fine-tune step (K={K} with grad, LRMs on z0, KL) --window-checkpointing {keep} {what[keep]}"
                       .rstrip(), cost[keep][0])
        pixel = run(1, "none", toy.toy_reward, toy.toy_prompts()[:1])
        est.report(f"RGB ReFL step (--reward pixel, K={K}, all frames, --window-checkpointing {args.window_checkpointing}"
                   ")", estimate.window_checkpointing_costs(pixel, lo, hi, K)[args.window_checkpointing][0])
    return est.results


def main(args: Args) -> dict:
    inputs, prompts, keep, eval_prompts = check_inputs(args)  # nothing has loaded yet, and no run folder exists
    if args.estimate_memory:
        return estimate_memory(args)
    rundir.seed_everything(args.seed)
    device, relabel = rundir.pick_device(args.device), args.relabel or (not args.data and args.teacher != "toy")
    teacher = load_teacher(args, device) if args.stage != "rm" or relabel else None  # none for --data's own scores
    pipe = common.load_backbone(args.backbone, device, common.pick_dtype(args.dtype, device), args.height, args.width,
                                args.num_frames)
    _ = args.gradient_checkpointing and pipe.transformer.enable_gradient_checkpointing()
    geo = common.backbone_geometry(pipe)
    data, meta = inputs or toy.toy_dataset(pipe, "score", args.toy_size, args.seed, cache_dir=args.toy_cache)
    dataset.check_latents(data, geo, args.data or args.toy_cache, keys=("latents",))  # (a hub id's: only now)
    if relabel:  # (the toy world's scores are the toy teacher's)
        print(f"re-labelling {len(data['latents'])} latents with the teacher '{args.teacher}'")
        data["score"] = pixel_reward(pipe, teacher, data["latents"], [meta["prompts"][i] for i in data["prompt_idx"]])
    L, n_eval, shape, ckpt = data["prompt_embeds"].shape[1], len(eval_prompts), geo["latent_shape"], args.reward_ckpt
    embeds, mask = common.encode_prompts(pipe, prompts, L) if args.prompts else [data[k] for k in dataset.PROMPT_KEYS]
    prompts, embeds, mask = [prompts[i] for i in keep], embeds[keep], mask[keep]  # held-out prompts only evaluate
    eval_embeds, eval_mask = common.encode_prompts(pipe, eval_prompts + [""] * (args.guidance_scale > 1), L)
    negative, eval_tokens = eval_embeds[n_eval:], last_text_token(eval_embeds, eval_mask)  # CFG: the empty prompt
    common.drop_text_encoder(pipe)
    run = rundir.Run("velr", args, args.out_dir or None, args.resume)  # only now: a failed start leaves no folder
    needs = args.stage == "rm" or args.reward == "latent" or "no-align" in args.compare  # LRMs (Eq. 7: every report)
    summary, lrm = dict(run_dir=str(run.dir), runs={}), ckpt and needs and load_lrm(ckpt, args, shape).to(device)
    _ = lrm and common.shard(types.SimpleNamespace(blocks=()), *lrm.members)  # torchrun (pretrain_lrm: its own)
    if needs and not ckpt:
        lrm, summary["lrm"] = pretrain_lrm(args, data, last_text_token(data["prompt_embeds"], data["prompt_mask"]),
                                           shape, device, run)
        common.save_safetensors(lrm.state_dict(), run.dir / "lrm.safetensors", dict(config=json.dumps(lrm.config)))
        summary.update({f"lrm_{r['LRM']}_test_{k.lower()}": r[f"test {k}"]  # single LRM vs the whole ensemble
                        for r in (summary["lrm"][0], summary["lrm"][-1]) for k in ("MSE", "PCC")})
        print(f"\nTable 3 in miniature (en-k: {args.aggregate} of k LRMs)\n{rundir.format_table(summary['lrm'])}")
        rundir.plot_metrics(run, "rm", ["huber"], "LRM pretraining: Huber (Eq. 6), mean of the members")
        rundir.plot(run.dir / "table3.png", {f"{s} {m}": ([int(r["LRM"][3:]) for r in summary["lrm"]], [r[f"{s} {m}"]
                    for r in summary["lrm"]]) for s in ("train", "test") for m in ("MSE", "PCC")}, "Table 3", "k")
    lrm_state = lrm and {k: v.clone() for k, v in lrm.state_dict().items()}

    def sample(tag):  # the current generator's evaluation samples (and mp4s): true reward and R_l
        _ = lrm and lrm.load_state_dict(lrm_state)  # the pretrained ensemble scores, and every run starts from it
        r, z, which = evaluate(pipe, teacher, eval_prompts, eval_embeds[:n_eval], args.eval_samples, args.num_steps,
                               args.guidance_scale, negative)
        for i, zi in enumerate(z[:args.save_videos].to(pipe.vae.device)):  # mp4s
            rundir.export_video(common.decode_latents(pipe, zi[None])[0], run.dir / "videos" / f"{tag}-{i}.mp4")
        return dict(true_reward=r, **({} if not lrm else {  # R_l through Eq. (7), as in training
            "lrm_reward": aggregate(predict(lrm, z, eval_tokens[which]), args.aggregate)}))
    latent = args.reward == "latent"  # velr: VELR; velr_noalign: without online alignment; pixel: RGB ReFL
    names = [n for n, on in (("velr", latent), ("velr_noalign", latent and "no-align" in args.compare),
                             ("pixel", not latent or "pixel" in args.compare)) if on and args.stage != "rm"]
    before, rows = names and sample("base"), []
    for name in names:
        stats = finetune(args, pipe, lrm, teacher, prompts, embeds, last_text_token(embeds, mask),
                         "pixel" if name == "pixel" else "latent", name == "velr", run, name)
        rundir.plot_metrics(run, f"tune-{name}", ["loss", "reward", "kl"] + ["pixel_reward", "gap"] * (name != "pixel"),
                            f"fine-tune {name}: Eq. (8)")
        paired, table = rundir.paired_summary(before, sample(name))
        pipe.transformer.delete_adapters(name)  # the next run starts from the base model again
        summary["runs"][name], summary[f"{name}_true_reward_gain"] = dict(paired, **stats), paired["true_reward_gain"]
        rows += [dict(run=name, **row) for row in table]
    print(f"\nFine-tuning: R (true_reward), R_l (pretrained ensemble) of {args.eval_samples} fresh samples of {n_eval} "
          f"held-out prompts, before / after / paired gain\n{rundir.format_table(rows)}" if names else "")
    summary["claims"] = [dict(claim=f"true-reward gain of the {n} LoRA over the base, held-out prompts (paired SE, "
                              f"n={args.eval_samples})", mean=g, se=se) for n in names
                         for g, se in [summary[f"{n}_true_reward_gain"]]]
    run.summary(summary)  # the claims: the table's true_reward gain (paired) rows
    print(f"\nrun folder {run.dir} (plots: {', '.join(sorted(p.name for p in run.dir.glob('*.png')))}); LRMs: "
          "lrm.safetensors (--reward-ckpt); LoRAs: lora-<run>/ (WanPipeline.load_lora_weights)")
    return summary


if __name__ == "__main__":
    rundir.cli(main, Args, TINY)
