"""toy.py: the embedded toy world (the offline default data) and the fitting of the tiny backbone.

    tiny backbone   build_tiny_pipeline() (common.load_backbone("tiny") calls it), TINY_WEIGHTS, fit_tiny_world
    toy world       toy_prompts, make_toy_clips, toy_reward (the pixel ground truth), true_reward (of a latent),
                    build_toy_dataset / toy_dataset (the same dataset layout as prepare.py writes)
    make demo       summarize(runs/demo): one table of every run's summary.json

The toy world stands in for the human labels and pixel reward models that cannot be downloaded here: coloured
squares that move, with prompts "a <colour> <shape> moving <direction>", and a differentiable pixel reward
that depends on the prompt AND on the motion, so one frame cannot score it.
Usage: python toy.py fit-tiny [VAE_STEPS GENERATOR_STEPS] | summarize RUNS_DIR
"""
from __future__ import annotations

import fcntl
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import dataset
from common import (WAN_CONFIGS, add_noise, backbone_geometry, decode_latents, encode_prompts, encode_video,
                    predict_velocity, sample_latents, save_safetensors, velocity_target)
from rundir import format_table

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
                                         num_steps=num_steps, desc=f"toy {kind}: sampling {len(gen_rows)} latents")
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
        raise ValueError(f"unknown dataset kind '{kind}' (one of {list(dataset.KEYS)})")
    meta = dict(kind=kind, prompts=prompts, source="toy", n=n, seed=seed, backbone="tiny", **{
        k: geo[k] for k in ("height", "width", "num_frames")})
    return tensors, meta


def binary_from_pairs(pairs: dict, meta: dict) -> tuple[dict, dict]:
    """The binary toy set inside a pairs toy set of the same n and seed: its A side, labelled as binary labels are."""
    tensors = {k: pairs[k] for k in ("prompt_embeds", "prompt_mask", "prompt_idx")}
    return dict(tensors, latents=pairs["latents_a"][:], label=(pairs["reward_a"] > TOY_GOOD).float()), \
        dict(meta, kind="binary")


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run building the same dataset (make demo, xdist): wait, reuse
        if (folder / "meta.json").is_file():
            return dataset.load(folder, kind)
        pairs = folder.with_name(folder.name.replace("binary-", "pairs-", 1))
        if kind == "binary" and (pairs / "meta.json").is_file():
            # a pairs set's A side is drawn exactly as the binary set of the same n and seed (the same generator
            # draws, latents and rewards: build_toy_dataset), so PRFL reuses PRISM's / DiNa-LRM's pairs for free
            print(f"the toy 'binary' dataset ({n} rows, seed {seed}): the A side of {pairs}", flush=True)
            tensors, meta = binary_from_pairs(*dataset.load(pairs, "pairs"))
        else:
            print(f"building the toy '{kind}' dataset ({n} rows, seed {seed}) into {folder} (once; later runs reuse "
                  "it)", flush=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # CPU sums differ with the thread count: one thread, the same set on any machine
            try:
                tensors, meta = build_toy_dataset(pipe, kind, n, seed, **kw)
            finally:
                torch.set_num_threads(threads)
        dataset.save(folder, tensors, meta)
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




def summarize(root) -> str:
    """What `make demo` prints: each run's claims (summary.json "claims": claim, mean, se) with their margin in SE,
    then one table of the other headline numbers in root/*/summary.json."""
    rows, claims = [], []
    for path in sorted(Path(root).glob("*/summary.json")):
        for c in json.loads(path.read_text()).get("claims", []):
            claims.append(dict(method=path.parent.name, claim=c["claim"], value=f"{c['mean']:+.3f} ± {c['se']:.3f}",
                               SE=f"{c['mean'] / c['se']:.1f}" if c["se"] > 0 else "-"))
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
                value = f"{value[0]:.3f} ± {value[1]:.3f}"  # [mean, se]
            if isinstance(value, (int, float, str)) and key != "claims":
                rows.append(dict(method=path.parent.name, metric=key, value=value))
    if not rows:
        return f"no summary.json under {root}"
    return (format_table(claims) + "\n\n" if claims else "") + format_table(rows)




if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        print(summarize(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "fit-tiny":
        fit_tiny_world(TINY_WEIGHTS, *(int(a) for a in sys.argv[2:4]))
        print(f"wrote {TINY_WEIGHTS}")
    else:
        print(__doc__.strip().split("\n")[-1])
