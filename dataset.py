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
