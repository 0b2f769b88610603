"""dataset.py: the latent dataset format that prepare.py and the toy world write and every method reads.

A dataset is a folder: meta.json {"kind", "prompts": [P strings], ...}, prompts.safetensors (the prompt table,
stored once: prompt_embeds [P, L, D], prompt_mask [P, L]) and shard-NNNNN.safetensors files of per-row tensors
(dim 0 = rows, each row with prompt_idx into the table). Kinds and their per-row keys:
    binary   latents [N, 16, F', H', W'], label [N] in {0, 1}          (PRFL)
    score    latents, score [N]                                         (VELR)
    pairs    latents_a, latents_b, pref [N]: 0 = A better, 1 = B, 2 = tie   (PRISM, DiNa-LRM)
    prompts  the prompt table; latents optional                         (fine-tuning prompts)
Every problem is reported as a common.UserError naming the folder, the file, the key and the rows.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common import UserError, save_json, save_safetensors

KEYS = {"binary": ("latents", "label"), "score": ("latents", "score"),
        "pairs": ("latents_a", "latents_b", "pref"), "prompts": ()}
PROMPT_KEYS = ("prompt_embeds", "prompt_mask")


def save(folder, tensors: dict, meta: dict, shard: int = 0):
    """Write one shard (shard-00000.safetensors) and meta.json; the prompt table goes in prompts.safetensors."""
    folder = Path(folder)
    rows = {k: v for k, v in tensors.items() if k not in PROMPT_KEYS}
    save_safetensors({k: tensors[k] for k in PROMPT_KEYS}, folder / "prompts.safetensors")
    save_safetensors(rows, folder / f"shard-{shard:05d}.safetensors")
    save_json(meta, folder / "meta.json")


def _read(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def load(folder, kind: str | None = None) -> tuple[dict, dict]:
    """Load and validate a dataset folder."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise UserError(f"{folder}: not a dataset folder (no meta.json); make one with prepare.py")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/meta.json: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KEYS:
        raise UserError(f"{folder}/meta.json: 'kind' must be one of {list(KEYS)}")
    if kind is not None and meta["kind"] != kind:
        raise UserError(f"{folder}/meta.json: kind is '{meta['kind']}', this method needs '{kind}'")
    if not (folder / "prompts.safetensors").is_file():
        raise UserError(f"{folder}: prompts.safetensors is missing")
    parts = [_read(s) for s in sorted(folder.glob("shard-*.safetensors"))]
    data = {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}
    data.update(_read(folder / "prompts.safetensors"))
    need = KEYS[meta["kind"]] + ("prompt_idx",) * bool(KEYS[meta["kind"]]) + PROMPT_KEYS
    for k in need:
        if k not in data:
            raise UserError(f"{folder}: key '{k}' missing (a '{meta['kind']}' dataset needs {need})")
    per_row = [k for k in data if k not in PROMPT_KEYS]  # a "prompts" dataset may have no per-row tensors
    row_key = per_row[0] if per_row else "prompt_embeds"
    n = len(data[row_key])
    if n == 0:
        raise UserError(f"{folder}: the dataset is empty")
    for k, v in data.items():
        if k in per_row and len(v) != n:
            raise UserError(f"{folder}: '{k}' has {len(v)} rows, '{row_key}' has {n}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = (~torch.isfinite(v.flatten(1) if v.ndim > 1 else v[:, None])).any(1).nonzero()[:5, 0].tolist()
            raise UserError(f"{folder}: '{k}' has NaN/inf values (rows {bad})")
    P = len(data["prompt_embeds"])
    if "prompt_idx" in data and (data["prompt_idx"].min() < 0 or data["prompt_idx"].max() >= P):
        bad = ((data["prompt_idx"] < 0) | (data["prompt_idx"] >= P)).nonzero()[:5, 0].tolist()
        raise UserError(f"{folder}: prompt_idx outside the {P} prompts (rows {bad})")
    if len(meta.get("prompts", [])) != P:
        raise UserError(f"{folder}/meta.json: {len(meta.get('prompts', []))} prompts listed, "
                        f"prompts.safetensors holds {P}")
    return data, meta


def check_latent_shape(latents, pipe, where: str):
    """Fail early when a dataset's latents do not fit the backbone (e.g. made for another one)."""
    c = pipe.transformer.config.in_channels
    if latents.ndim != 5 or latents.shape[1] != c:
        raise UserError(f"{where}: latents have shape {tuple(latents.shape)}, the backbone needs [N, {c}, F', H', W']")
    p = pipe.transformer.config.patch_size
    if latents.shape[3] % p[1] or latents.shape[4] % p[2]:
        raise UserError(f"{where}: latent height/width {tuple(latents.shape[3:])} not divisible by the patch {p[1:]}")


def split_indices(n: int, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train / held-out split of n rows."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(n * test_fraction)))
    return perm[k:], perm[:k]


def video_size(meta: dict, where: str, height=None, width=None, num_frames=None) -> dict:
    """The clip size recorded in a dataset's meta.json (prepare.py writes it), checked against the typed
    --height / --width / --num-frames: a size that differs from the data's is an error naming the flag."""
    size = {}
    for key, typed in (("height", height), ("width", width), ("num_frames", num_frames)):
        have = meta.get(key)
        if typed is not None and have is not None and typed != have:
            raise UserError(f"--{key.replace('_', '-')} {typed}: {where} was prepared at {meta.get('height')}x"
                            f"{meta.get('width')}x{meta.get('num_frames')} (height x width x frames); leave the flag "
                            f"out, or prepare the data again at the size you want", 2)
        size[key] = typed if typed is not None else have
    return size


def drop_repeats(data: dict, kind: str, policy: str, where: str) -> dict:
    """Rows that repeat or contradict others, by an exact hash of each row's latents and its prompt: the same row
    twice (a duplicate: the first is kept), the same latents and prompt with another label / score / preference (a
    contradiction: all of them go), and a pair of one latent with a winner. Either kind would also sit on both sides
    of a held-out split. policy "fail": a UserError naming the rows; "drop": they are dropped, and it says so."""
    if kind == "prompts" and "latents" not in data:
        return data
    digest = lambda x: hashlib.blake2b(x.contiguous().view(torch.uint8).numpy(), digest_size=16).digest()
    target = {"binary": "label", "score": "score", "pairs": "pref"}.get(kind)
    groups, why = {}, {}
    for i in range(len(data["prompt_idx"])):
        p, y = int(data["prompt_idx"][i]), data[target][i].item() if target else None
        if kind == "pairs":
            a, b = digest(data["latents_a"][i]), digest(data["latents_b"][i])
            a, b, y = (b, a, (1, 0, 2)[int(y)]) if a > b else (a, b, y)  # (A, B, A wins) is (B, A, B wins)
            if a == b and y != 2:
                why[i] = "latents_a and latents_b are the same, yet one is labelled better"
            key = (a, b, p)
        else:
            key = (digest(data["latents"][i]), p)
        groups.setdefault(key, []).append((i, y))
    for rows in groups.values():
        if len({y for _, y in rows}) > 1:
            why.update({i: f"contradicts row(s) {[j for j, _ in rows if j != i]} (same latents and prompt)" for i, _ in rows})
        else:
            for i, _ in rows[1:]:
                why.setdefault(i, f"duplicate of row {rows[0][0]}")
    if why and policy == "fail":
        raise UserError(f"{where}: {len(why)} row(s) repeat or contradict others:\n" + "".join(
            f"  row {i}: {r}\n" for i, r in sorted(why.items())[:10]) + "fix the data, or pass --on-duplicates drop")
    if not why:
        return data
    print(f"{where}: {len(why)} duplicate or contradicting row(s) dropped (--on-duplicates drop)")
    keep = torch.tensor(sorted(set(range(len(data["prompt_idx"]))) - set(why)), dtype=torch.long)
    return {k: v if k in PROMPT_KEYS else v[keep] for k, v in data.items()}


def check_latents(data: dict, geo: dict, where: str, keys=("latents", "latents_a", "latents_b")):
    """Each latent key holds latents of the shape common.geometry gives for the video size, of normalised-VAE scale
    (|x| <= 1e4: a finite 1e30 would still train, to nothing)."""
    for k in keys:
        if k not in data:
            continue
        have = tuple(data[k].shape[1:])
        if have != tuple(geo["latent_shape"]):
            raise UserError(f"{where}: '{k}' holds latents {have}; this backbone makes {tuple(geo['latent_shape'])} "
                            f"of a {geo['height']}x{geo['width']}x{geo['num_frames']} video: prepare the data with "
                            f"this backbone, or pass the size it was made at")
        big = (data[k][:].flatten(1).abs().amax(1) > 1e4).nonzero()[:5, 0].tolist()
        if big:
            raise UserError(f"{where}: '{k}' has values above 1e4 (rows {big}); normalised VAE latents are about unit "
                            f"scale: prepare.py the videos with this --backbone")
