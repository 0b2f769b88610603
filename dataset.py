"""dataset.py: the latent dataset format that prepare.py and the toy world write and every method reads.

A dataset is a folder: meta.json {"kind", "prompts": [P strings], ...}, prompts.safetensors (the prompt table,
stored once: prompt_embeds [P, L, D], prompt_mask [P, L]) and shard-NNNNN.safetensors files of per-row tensors
(dim 0 = rows, each row with prompt_idx into the table). Kinds and their per-row keys:
    binary   latents [N, 16, F', H', W'], label [N] in {0, 1}          (PRFL)
    score    latents, score [N]                                         (VELR)
    pairs    latents_a, latents_b, pref [N]: 0 = A better, 1 = B, 2 = tie   (PRISM, DiNa-LRM)
    prompts  the prompt table; latents optional                         (fine-tuning prompts)
load(folder, lazy=True) leaves the latents on disk (`Rows`: rows[idx] reads only those rows, with positioned reads
of the safetensors shards, so neither the heap nor the page mappings grow with the dataset); they may be stored in
bf16 (read back as fp32). A pairs dataset may store each distinct video once: `latents` + `index_a` / `index_b` per
pair instead of latents_a / latents_b (load gives latents_a / latents_b either way). `batches` feeds a training loop
through a torch DataLoader with workers, in an order fixed by (seed, step), so a resumed run reads the same rows.
Every problem is reported as a common.UserError naming the folder, the file, the key and the rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from common import UserError, rank_world, save_json, save_safetensors

KEYS = {"binary": ("latents", "label"), "score": ("latents", "score"),
        "pairs": ("latents_a", "latents_b", "pref"), "prompts": ()}
PROMPT_KEYS = ("prompt_embeds", "prompt_mask")


LATENT_KEYS = ("latents", "latents_a", "latents_b")  # the big per-row tensors: on disk with lazy=True


def save(folder, tensors: dict, meta: dict, shard: int = 0, latent_dtype: torch.dtype | None = None):
    """Write one shard (shard-00000.safetensors) and meta.json; the prompt table goes in prompts.safetensors.
    latent_dtype=torch.bfloat16 halves the latents on disk."""
    folder = Path(folder)
    rows = {k: v.to(latent_dtype) if k in LATENT_KEYS and latent_dtype else v
            for k, v in tensors.items() if k not in PROMPT_KEYS}
    save_safetensors({k: tensors[k] for k in PROMPT_KEYS}, folder / "prompts.safetensors")
    save_safetensors(rows, folder / f"shard-{shard:05d}.safetensors")
    save_json(meta, folder / "meta.json")


def _read(path: Path, skip=()) -> dict:
    try:
        if not skip:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in skip}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class Rows:
    """A per-row tensor of one key over the shards, left on disk: rows[idx] (int, slice, list, LongTensor) reads just
    those rows as fp32 (os.pread at the offsets of the safetensors header: no mmap, so memory stays flat however many
    rows a run touches). `index` maps rows to stored rows (pairs whose videos are stored once). Picklable: a
    DataLoader worker opens its own file handles."""

    def __init__(self, files: list, key: str, index: torch.Tensor | None = None):
        self.files, self.key, self.index, self.spans = [str(f) for f in files], key, index, []
        for f in self.files:
            with open(f, "rb") as h:
                n = struct.unpack("<Q", h.read(8))[0]
                info = json.loads(h.read(n))[key]
            if info["dtype"] not in _DTYPES:
                raise UserError(f"{f}: '{key}' is {info['dtype']}; latents must be F32, BF16 or F16")
            self.spans.append((8 + n + info["data_offsets"][0], info["shape"][0]))
            self.row_shape, self.stored_dtype = tuple(info["shape"][1:]), _DTYPES[info["dtype"]]
        self.row_bytes = self.stored_dtype.itemsize * int(torch.Size(self.row_shape).numel())
        self.offsets = torch.tensor([0] + [rows for _, rows in self.spans]).cumsum(0)
        self.stored = int(self.offsets[-1])
        self.shape = torch.Size([len(index) if index is not None else self.stored, *self.row_shape])
        self.ndim, self.dtype, self._fds = len(self.shape), torch.float32, {}

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):
        return dict(self.__dict__, _fds={})

    def subset(self, rows) -> "Rows":
        """The same stored rows seen through `rows` (nothing is read)."""
        out = Rows.__new__(Rows)
        out.__dict__.update(self.__getstate__())
        out.index = (self.index if self.index is not None else torch.arange(self.stored))[torch.as_tensor(rows)]
        out.shape = torch.Size([len(out.index), *self.row_shape])
        return out

    def read_stored(self, i: int) -> torch.Tensor:
        """Stored row i, as stored (bf16 stays bf16)."""
        s = int(torch.searchsorted(self.offsets, torch.tensor(i), right=True)) - 1
        if s not in self._fds:
            self._fds[s] = os.open(self.files[s], os.O_RDONLY)
        start = self.spans[s][0] + (i - int(self.offsets[s])) * self.row_bytes
        buf = bytearray(os.pread(self._fds[s], self.row_bytes, start))
        return torch.frombuffer(buf, dtype=self.stored_dtype).view(self.row_shape)

    def __getitem__(self, idx):
        single = isinstance(idx, int)
        idx = torch.arange(len(self))[idx] if isinstance(idx, (int, slice)) else torch.as_tensor(idx, dtype=torch.long)
        idx = idx.reshape(-1)
        stored = self.index[idx] if self.index is not None else idx
        out = torch.stack([self.read_stored(int(i)).float() for i in stored]) if len(stored) else torch.empty(0, *self.row_shape)
        return out[0] if single else out

    def chunks(self, mib: int = 8):
        """(stored row numbers, rows) of every stored row, about `mib` MiB (fp32) at a time: for scans (NaN, scale,
        hashes); a 480p latent is 8 MiB, so never a fixed number of rows."""
        size = max(1, (mib << 20) // (4 * int(torch.Size(self.row_shape).numel())))
        for a in range(0, self.stored, size):
            ids = range(a, min(a + size, self.stored))
            yield ids, torch.stack([self.read_stored(i).float() for i in ids])

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def load(folder, kind: str | None = None, lazy: bool = False) -> tuple[dict, dict]:
    """Load and validate a dataset folder; lazy=True leaves the latents on disk (Rows)."""
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
    files = sorted(folder.glob("shard-*.safetensors"))
    parts = [_read(s, skip=LATENT_KEYS if lazy else ()) for s in files]
    data = {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}
    if not lazy:  # in memory: fp32, however stored
        data.update({k: v.float() for k, v in data.items() if k in LATENT_KEYS})
    if lazy and files:
        with safe_open(str(files[0]), "pt") as f:
            keys = [k for k in f.keys() if k in LATENT_KEYS]
        try:
            data.update({k: Rows(files, k) for k in keys})
        except (KeyError, ValueError, struct.error, OSError) as e:
            raise UserError(f"{folder}: the shards do not all hold {keys} readably ({e!r})") from None
    if "index_a" in data:  # videos stored once: latents_a / latents_b are the table seen through the pair indices
        table = data.pop("latents")
        for side in "ab":
            index = data.pop(f"index_{side}").long()
            if len(index) and not 0 <= index.min() <= index.max() < len(table):
                raise UserError(f"{folder}: index_{side} points outside the {len(table)} stored videos")
            data[f"latents_{side}"] = table.subset(index) if isinstance(table, Rows) else table[index]
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
        if isinstance(v, Rows):
            for ids, rows in v.chunks():  # one chunk in memory at a time
                bad = (~torch.isfinite(rows.flatten(1))).any(1).nonzero()[:5, 0].tolist()
                if bad:
                    raise UserError(f"{folder}: '{k}' has NaN/inf values (stored rows {[ids[i] for i in bad]})")
        elif v.is_floating_point() and not torch.isfinite(v).all():
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
    digest = lambda x: hashlib.blake2b(x.float().contiguous().view(torch.uint8).numpy(), digest_size=16).digest()

    def digests(x):  # one per row; a lazy table is hashed chunk by chunk, each stored video once
        if not isinstance(x, Rows):
            return [digest(r) for r in x]
        stored = [digest(r) for _, rows in x.chunks() for r in rows]
        return [stored[i] for i in (x.index.tolist() if x.index is not None else range(x.stored))]

    hashes = {k: digests(data[k]) for k in LATENT_KEYS if k in data}
    target = {"binary": "label", "score": "score", "pairs": "pref"}.get(kind)
    groups, why = {}, {}
    for i in range(len(data["prompt_idx"])):
        p, y = int(data["prompt_idx"][i]), data[target][i].item() if target else None
        if kind == "pairs":
            a, b = hashes["latents_a"][i], hashes["latents_b"][i]
            a, b, y = (b, a, (1, 0, 2)[int(y)]) if a > b else (a, b, y)  # (A, B, A wins) is (B, A, B wins)
            if a == b and y != 2:
                why[i] = "latents_a and latents_b are the same, yet one is labelled better"
            key = (a, b, p)
        else:
            key = (hashes["latents"][i], p)
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
    return {k: v if k in PROMPT_KEYS else v.subset(keep) if isinstance(v, Rows) else v[keep] for k, v in data.items()}


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
        chunks = data[k].chunks() if isinstance(data[k], Rows) else [(range(len(data[k])), data[k])]
        big = [ids[i] for ids, rows in chunks for i in (rows.flatten(1).abs().amax(1) > 1e4).nonzero()[:5, 0].tolist()][:5]
        if big:
            raise UserError(f"{where}: '{k}' has values above 1e4 (rows {big}); normalised VAE latents are about unit "
                            f"scale: prepare.py the videos with this --backbone")


# ==== Feeding a training loop: a DataLoader whose order is a function of (seed, step), so --resume reads the same rows
def batch_rows(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The dataset rows of training step `step`: consecutive slices of a fresh permutation of the n rows per epoch
    (every row once per epoch), drawn from a generator seeded by (seed, epoch): no state to save."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        at = pos // n == epoch
        out[at] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[pos[at] % n]
    return out


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this process's share of step `step`'s batch: {key: data[key][rows]} for `keys` and "rows" (the
    dataset row numbers). `rows` restricts the dataset (a train split). Under torchrun each rank reads only its share."""

    def __init__(self, data: dict, keys, batch: int, seed: int, rows: torch.Tensor | None = None):
        self.data, self.keys, self.batch, self.seed = data, list(keys), batch, seed
        self.rows = rows if rows is not None else torch.arange(len(data[self.keys[0]]))
        self.rank, self.world = rank_world()

    def __len__(self):
        return 2**62

    def __getitem__(self, step: int) -> dict:
        rows = self.rows[batch_rows(step, len(self.rows), self.batch, self.seed)]
        rows = rows.chunk(self.world)[self.rank] if self.world > 1 else rows
        return dict(rows=rows, **{k: self.data[k][rows] for k in self.keys})


def batches(data: dict, keys, batch: int, seed: int, start: int, rows=None, workers: int | None = None):
    """Batches for steps start, start+1, ... through a DataLoader (workers: 2 when latents are on disk, else 0: an
    in-memory toy set gains nothing from them). Use as `for step, b in zip(run.steps(...), batches(...))`."""
    lazy = any(isinstance(data[k], Rows) for k in keys)
    workers = (2 if lazy else 0) if workers is None else workers
    steps = range(start, 2**62)
    return iter(torch.utils.data.DataLoader(StepBatches(data, keys, batch, seed, rows), batch_size=None,
                                            sampler=steps, num_workers=workers,
                                            persistent_workers=False, prefetch_factor=2 if workers else None))
