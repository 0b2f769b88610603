"""prepare.py: from videos and prompts on disk to the latent datasets every method trains on.

One preparation step shared by prfl.py, velr.py, prism.py and dina_lrm.py. It writes the folder the
toy world writes (the layout of dataset.save / dataset.load), for any backbone:

    prompts.safetensors   prompt_embeds [P, L, D] (T5, zero-padded as Wan does), prompt_mask [P, L]
    shard-NNNNN.safetensors   per-row tensors: prompt_idx, row (the manifest row) and
                          binary: latents, label | score: latents, score | pairs: latents (each distinct
                          video of the shard once), index_a, index_b,
                          pref (0 = A, 1 = B, 2 = tie) | prompts: latents when the manifest has videos
    meta.json             {"kind", "prompts": [P strings], backbone, geometry, source, counts}, written last
    progress.json         the rows in each finished shard (a rerun skips them); bad_rows.json (--skip-bad)

Inputs (--input; the kind is read from the columns unless --kind says):
    prompts.txt           one prompt a line -> "prompts" (fine-tuning prompts, no videos)
    .csv / .jsonl / .json one video a row: video, prompt, plus label (0/1, good/poor) -> "binary", or
                          score -> "score", or PRFL's physics_quality + human_quality -> "binary" (label =
                          both good: the official HY-Video-PRFL motion_quality task), or nothing -> "prompts"
                          with the videos' latents (real clips, e.g. PRFL's flow-matching SFT data)
    pairs .csv            VideoGen-RewardBench / VideoAlign: path_A, path_B, prompt and the label column
                          --pair-label (Overall | VQ | MQ | TA; values A / B / same) -> "pairs", or
                          --pair-label prism: PRISM's vote over VQ, MQ, TA [P-sup §1] (all same -> tie; the
                          non-tie votes agree -> that side; a conflict drops the pair)

Steps: (1) read the manifest, parse every label and probe every video (exists, ffmpeg reads its header,
long enough for --num-frames at --fps): stop naming every bad row, or with --skip-bad report them and go
on; (2) per shard, in threads ahead of the VAE: read the video with imageio-ffmpeg, take the source frame
nearest in time to each target frame (from the start), scale so the frame covers the target size (short
side first, aspect kept) and centre-crop; encode with the backbone's VAE (posterior mean, normalised as
the pipeline does: common.encode_video); write the shard atomically, then record it; (3) encode each
distinct prompt once with T5 (it only now goes to the GPU); (4) meta.json, then dataset.load(lazy=True) as a check.

Follows HY-Video-PRFL's gen_wanx_latent.py where it has a convention (16 fps, 4k+1 frames, short side
resize + centre crop, VAE mean latents) and VideoAlign's CSV columns for pairs. Differs: PRFL counts a
missing physics/human key as "poor"; here an empty or unknown label is a bad row (explicit beats silent).
"""
from __future__ import annotations

import csv
import io
import hashlib
import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
import rundir
import dataset


@dataclass
class Args:
    # input / output
    input: str = common.arg("", "prompts .txt (one a line), or a .csv / .jsonl / .json manifest of videos or pairs")
    out_dir: str = common.arg("", "output dataset folder (what the method scripts take with --data)")
    kind: str = common.arg("auto", "dataset kind; auto: .txt -> prompts, path_A/path_B -> pairs, label or "
                           "physics_quality+human_quality -> binary, score -> score, none of these -> prompts "
                           "(with the videos' latents when there is a video column)",
                           choices=["auto", "binary", "score", "pairs", "prompts"])
    video_root: str = common.arg("", "folder that relative video paths start from (default: the manifest's folder)")
    pair_label: str = common.arg("Overall", "pairs: the label column (VideoGen-RewardBench: Overall, VQ, MQ, TA; "
                                 "values A / B / same), or 'prism' for PRISM's conservative vote over VQ, MQ, TA")
    score_source: str = common.arg("", "score: who made the scores (e.g. pickscore); kept as meta 'teacher', which "
                                   "velr.py compares with its --teacher (it re-labels the latents when they differ)")
    skip_bad: bool = common.arg(False, "record bad rows in <out-dir>/bad_rows.json and keep the good ones "
                                "(default: stop and name every bad row)")
    overwrite: bool = common.arg(False, "replace the dataset in --out-dir (the new one is written beside it and swapped in "
                                 "only when complete); otherwise a run resumes, and refuses an --out-dir made with "
                                 "other inputs or settings")
    on_duplicates: str = common.arg("fail", "rows with the same videos and prompt (duplicates, or contradicting labels) "
                                    "and pairs of one video with a winner: fail naming them, or drop them (the first "
                                    "of identical duplicates is kept; contradictions are dropped whole)",
                                    choices=["fail", "drop"])
    # backbone and video geometry (unset = the backbone's own: tiny 32x32x9, Wan2.1-1.3B 480x832x81, 14B 720x1280x81)
    backbone: str = common.arg("tiny", "tiny | wan2.1-1.3b | wan2.1-14b | a local diffusers Wan folder / hub id")
    device: str = common.arg("auto", "where T5 and the VAE run (auto: cuda if available); the DiT is never moved there")
    height: int = common.arg(None, "video height in pixels, a multiple of 16 (default: the backbone's)", type=int)
    width: int = common.arg(None, "video width in pixels, a multiple of 16 (default: the backbone's)", type=int)
    num_frames: int = common.arg(None, "frames per clip, 4k+1 (default: the backbone's)", type=int)
    fps: float = common.arg(16.0, "frame rate clips are resampled to (Wan2.1 and PRFL's preprocessing: 16)", min=1e-3)
    max_sequence_length: int = common.arg(None, "T5 tokens per prompt (default: the backbone's; 512 for Wan)", type=int)
    # work
    shard_size: int = common.arg(64, "rows per shard (a shard is the unit of resuming; Wan 480p pairs: ~17 MB a row)",
                                 min=1)
    latent_dtype: str = common.arg("fp32", "latents on disk: bf16 halves them (the DiT runs in bf16 on a GPU anyway)",
                                   choices=["fp32", "bf16"])
    workers: int = common.arg(8, "threads probing and decoding videos ahead of the VAE", min=1)


LABEL_VALUES = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "good": 1.0, "poor": 0.0, "bad": 0.0,
                "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
PAIR_VALUES = {"a": 0, "b": 1, "same": 2, "tie": 2}    # pref: 0 = A better, 1 = B better, 2 = tie
VIDEO_COLUMNS, PROMPT_COLUMNS = ("video", "video_path", "path"), ("prompt", "caption", "long_caption", "text")


# ----------------------------------------------------------------------------------------------
# Manifest: rows -> (kind, rows with parsed targets), every problem named with its row
# ----------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A manifest's text: UTF-8, with or without the byte-order mark Excel writes; anything else is named with its line."""
    if not path.is_file():
        raise common.UserError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise common.UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the manifest as UTF-8, "
                               f"e.g. iconv -f latin1 -t utf-8") from None


def read_rows(path: Path) -> list[dict]:
    """Rows of a .csv / .jsonl / .json manifest, each with `_row` (1-based data row) and `_line` (file line)."""
    text = read_text(path)
    if path.suffix == ".csv":
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise common.UserError(f"{path}: empty file")
            reader.fieldnames = [c.strip() for c in reader.fieldnames]
            rows = [dict(r, _line=reader.line_num) for r in reader]
    elif path.suffix == ".jsonl":
        rows = []
        for line, item in enumerate(text.splitlines(), start=1):
            if item.strip():
                try:
                    rows.append(dict(json.loads(item), _line=line))
                except (json.JSONDecodeError, TypeError) as e:
                    raise common.UserError(f"{path}:{line}: not a JSON object ({e})") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise common.UserError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise common.UserError(f"{path}: a .json manifest is a list of objects (one per video or pair)")
        rows = [dict(r, _line=None) for r in rows]
    else:
        raise common.UserError(f"{path}: unknown manifest type '{path.suffix}' (.txt prompts, .csv, .jsonl or .json)")
    for i, r in enumerate(rows, start=1):
        r["_row"] = i
    if not rows:
        raise common.UserError(f"{path}: no rows")
    return rows


def infer_kind(columns: set, path: Path) -> str:
    """pairs / binary / score from the columns; none of them: prompts (plus latents if there are videos)."""
    if {"path_A", "path_B"} <= columns:
        return "pairs"
    binary, score = "label" in columns or {"physics_quality", "human_quality"} <= columns, "score" in columns
    if binary and score:
        raise common.UserError(f"{path}: has both label and score columns; choose with --kind binary|score")
    kind = "binary" if binary else "score" if score else "prompts"
    known = {"path_A", "path_B", "label", "score", "physics_quality", "human_quality", "VQ", "MQ", "TA", "Overall",
             *VIDEO_COLUMNS, *PROMPT_COLUMNS}
    if kind == "prompts" and columns - known:  # e.g. "lable": a labelled manifest must not become prompts-only
        raise common.UserError(f"{path}: columns {sorted(columns - known)} are not recognised, so the manifest reads as "
                               f"prompts only; rename the label column (label, score, path_A/path_B, ...) or pass "
                               f"--kind prompts to ignore them")
    return kind


def _first(row: dict, names) -> str:
    return next((str(row[n]).strip() for n in names if row.get(n) not in (None, "")), "")


def parse_label(value, column: str) -> float:
    """0/1, good/poor, true/false (case-insensitive) -> 1.0 / 0.0; anything else is an error."""
    key = str(value).strip().lower() if value is not None else ""
    if key not in LABEL_VALUES:
        raise ValueError(f"unknown {column} value '{value}' (expected one of 1/0, good/poor, true/false)")
    return LABEL_VALUES[key]


def prism_vote(votes: list[str]) -> int | None:
    """PRISM's label aggregation over (VQ, MQ, TA) [P-sup §1]: all tie -> tie; the non-tie votes all point
    the same way -> that side; a conflict -> None (the pair is dropped)."""
    sides = {v for v in votes if v != 2}
    return 2 if not sides else (sides.pop() if len(sides) == 1 else None)


def parse_target(row: dict, kind: str, pair_label: str):
    """The row's training target: label (binary), score, or pref (pairs); raises ValueError naming the problem."""
    if kind == "binary":
        if row.get("label") not in (None, ""):
            return parse_label(row["label"], "label")
        # official HY-Video-PRFL task 'motion_quality': label = physics_quality AND human_quality
        return min(parse_label(row.get(c), c) for c in ("physics_quality", "human_quality"))
    if kind == "score":
        try:
            s = float(row.get("score"))
        except (TypeError, ValueError):
            raise ValueError(f"score '{row.get('score')}' is not a number") from None
        if not math.isfinite(s) or abs(s) > torch.finfo(torch.float32).max:  # stored as float32
            raise ValueError(f"score {row.get('score')} is not a finite float32")
        return s
    columns = ["VQ", "MQ", "TA"] if pair_label == "prism" else [pair_label]
    votes = []
    for c in columns:
        v = str(row.get(c) or "").strip().lower()
        if v not in PAIR_VALUES:
            raise ValueError(f"unknown {c} value '{row.get(c)}' (expected A, B or same)")
        votes.append(PAIR_VALUES[v])
    return prism_vote(votes) if pair_label == "prism" else votes[0]


def video_path(value: str, root: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


# ----------------------------------------------------------------------------------------------
# Video: probe, read at the target fps, resize + centre-crop
# ----------------------------------------------------------------------------------------------
def probe_video(path: Path) -> dict:
    """ffmpeg's header: fps, duration (s), size (w, h). Cheap: no frame is decoded."""
    import imageio_ffmpeg
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(gen)
    finally:
        gen.close()


def resample_indices(src_fps: float, fps: float, num_frames: int) -> list[int]:
    """Source frame for each target frame k: the nearest in time to k / fps, starting at the first frame."""
    return [int(math.floor(k * src_fps / fps + 0.5)) for k in range(num_frames)]


def check_video(path: Path, fps: float, num_frames: int) -> str | None:
    """None if the video can give `num_frames` frames at `fps`, else the reason it cannot."""
    if not path.is_file():
        return f"video not found: {path}"
    try:
        meta = probe_video(path)
    except Exception as e:  # ffmpeg cannot parse it: not a video, truncated header, ...
        return f"unreadable video {path} ({str(e).strip().splitlines()[0][:120]})"
    if not meta.get("fps") or not meta.get("duration"):
        return f"unreadable video {path} (ffmpeg reports fps={meta.get('fps')}, duration={meta.get('duration')})"
    have = int(round(meta["duration"] * meta["fps"]))
    need = resample_indices(meta["fps"], fps, num_frames)[-1] + 1
    if have < need:
        return (f"too few frames in {path}: {have} at {meta['fps']:g} fps ({meta['duration']:.2f} s), "
                f"{num_frames} frames at {fps:g} fps need {need} ({(num_frames - 1) / fps:.2f} s)")
    import imageio_ffmpeg  # the header can be intact over cut or garbage data: decode the frames we will use
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        next(gen)
        decoded = sum(1 for _, _ in zip(range(need), gen))
    except Exception as e:
        return f"undecodable video {path} ({str(e).strip().splitlines()[0][:120]})"
    finally:
        gen.close()
    return None if decoded >= need else f"too few decodable frames in {path}: {decoded} of the {need} needed"


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """frames [F, 3, h, w] -> [F, 3, height, width]: scale (aspect kept) so the frame covers the target,
    then cut the centre, as PRFL's preprocessing (resize the short side, centre-crop)."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[..., top:top + height, left:left + width]


def read_video(path: Path, fps: float, num_frames: int, height: int, width: int) -> torch.Tensor:
    """A clip [3, F, H, W] in [-1, 1]: frames at `fps` from the start, resized and centre-cropped."""
    import imageio_ffmpeg
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
        w, h = meta["size"]
        idx = resample_indices(meta["fps"], fps, num_frames)
        wanted, frames = set(idx), {}
        for i, raw in enumerate(gen):  # stream: resize only the frames we need, stop after the last one
            if i in wanted:            # (one frame at a time: a 1080p source never sits in memory whole)
                frame = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(1, h, w, 3).copy())
                frames[i] = resize_center_crop(frame.permute(0, 3, 1, 2).float(), height, width)[0]
            if i >= idx[-1]:
                break
    finally:
        gen.close()
    if len(frames) < len(wanted):
        raise ValueError(f"too few frames in {path}: it ended before frame {idx[-1] + 1} "
                         f"({num_frames} frames at {fps:g} fps)")
    x = torch.stack([frames[i] for i in idx], dim=1).clamp(0, 255)  # [3, F, H, W], 0..255
    return x / 127.5 - 1


def prefetch(fn, items, ahead: int):
    """Yield (item, future of fn(item)) in order, computing up to `ahead` items in threads (ffmpeg decodes
    the next videos while the VAE encodes this one), never holding more than `ahead` results."""
    items = iter(items)
    with ThreadPoolExecutor(max(1, ahead)) as pool:
        queue = deque()
        for item in items:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > ahead:
                yield queue.popleft()
        while queue:
            yield queue.popleft()


# ----------------------------------------------------------------------------------------------
# Plan: validate every row before any heavy work
# ----------------------------------------------------------------------------------------------
def plan_rows(args, geo: dict) -> tuple[str, list[dict], list[dict], int]:
    """(kind, good rows with `target`, `videos`, `prompt`; bad rows with `reason`; pairs dropped by the PRISM vote)."""
    path = Path(args.input)
    if path.suffix == ".txt":
        if not path.is_file():
            raise common.UserError(f"{path}: no such file")
        if args.kind not in ("auto", "prompts"):
            raise common.UserError(f"{path}: a .txt file is a prompts list; it cannot make a '{args.kind}' dataset")
        lines = [(n, p.strip()) for n, p in enumerate(read_text(path).splitlines(), 1) if p.strip()]
        if not lines:
            raise common.UserError(f"{path}: no prompts")
        return "prompts", [dict(_row=i, _line=n, prompt=p, videos=[]) for i, (n, p) in enumerate(lines, 1)], [], 0
    rows = read_rows(path)
    columns = set().union(*(r.keys() for r in rows)) - {"_row", "_line"}
    kind = infer_kind(columns, path) if args.kind == "auto" else args.kind
    need = ["VQ", "MQ", "TA"] if args.pair_label == "prism" else [args.pair_label]
    if kind == "pairs" and not set(need) <= columns:
        raise common.UserError(f"{path}: no {need} column(s) for --pair-label {args.pair_label} (columns: {sorted(columns)})")
    root = Path(args.video_root) if args.video_root else path.parent
    good, bad, dropped = [], [], 0
    with_videos = kind != "prompts" or bool(columns & set(VIDEO_COLUMNS))  # prompts + videos: SFT latents
    for r in rows:
        prompt = _first(r, PROMPT_COLUMNS)
        try:
            if not prompt:
                raise ValueError(f"no prompt (columns {list(PROMPT_COLUMNS)})")
            if kind == "pairs":
                if not (_first(r, ["path_A"]) and _first(r, ["path_B"])):
                    raise ValueError("empty path_A or path_B")
                videos = [video_path(_first(r, [k]), root) for k in ("path_A", "path_B")]
            elif with_videos:
                if not _first(r, VIDEO_COLUMNS):
                    raise ValueError(f"no video (columns {list(VIDEO_COLUMNS)})")
                videos = [video_path(_first(r, VIDEO_COLUMNS), root)]
            else:
                videos = []
            target = None if kind == "prompts" else parse_target(r, kind, args.pair_label)
        except ValueError as e:
            bad.append(dict(row=r["_row"], line=r["_line"], reason=str(e)))
            continue
        if kind == "pairs" and target is None:  # PRISM's rule drops conflicting votes: not an error
            dropped += 1
            continue
        good.append(dict(_row=r["_row"], _line=r["_line"], prompt=prompt, videos=videos, target=target))
    if with_videos:
        good, repeated = check_duplicates(good, kind, args.on_duplicates, path)
        bad += repeated
        outside = [v for r in good for v in r["videos"] if not v.resolve().is_relative_to(root.resolve())]
        if outside:
            print(f"warning: {len(outside)} video path(s) lie outside {root} (e.g. {outside[0]}); check the manifest")
    # probe each distinct video once (a benchmark video is often in several pairs), in threads
    unique = sorted({v for r in good for v in r["videos"]})
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        problems = dict(zip(unique, tqdm(pool.map(lambda v: check_video(v, args.fps, geo["num_frames"]), unique),
                                         total=len(unique), desc="probe videos", disable=not unique)))
    ok = []
    for r in good:
        reasons = [problems[v] for v in r["videos"] if problems[v]]
        if reasons:
            bad.append(dict(row=r["_row"], line=r["_line"], reason="; ".join(reasons)))
        else:
            ok.append(r)
    bad.sort(key=lambda b: b["row"])
    if not with_videos:  # a prompts table from a manifest: each prompt once
        first = {}
        for r in ok:
            first.setdefault(r["prompt"], r)
        ok = list(first.values())
    return kind, ok, bad, dropped


def check_duplicates(rows: list[dict], kind: str, policy: str, path) -> tuple[list[dict], list[dict]]:
    """Rows with the same videos and prompt: with the same target they are duplicates (the first is kept), with
    different targets they contradict each other (all dropped): either would also land in both train and test.
    A pair of one video with a winner contradicts itself. policy fail: stop naming them; drop: bad rows."""
    groups, why = {}, {}
    for r in rows:
        groups.setdefault((tuple(map(str, r["videos"])), r["prompt"]), []).append(r)
        if kind == "pairs" and r["videos"][0] == r["videos"][1] and r["target"] != 2:
            why[r["_row"]] = "path_A and path_B are the same video, yet one is labelled better"
    for group in groups.values():
        if len({r["target"] for r in group}) > 1:
            for r in group:
                why[r["_row"]] = f"contradicts row(s) {[o['_row'] for o in group if o is not r]} (same videos and prompt)"
        else:
            for r in group[1:]:
                why[r["_row"]] = f"duplicate of row {group[0]['_row']}"
    bad = [dict(row=r["_row"], line=r["_line"], reason=why[r["_row"]], dropped=True) for r in rows if r["_row"] in why]
    if bad and policy == "fail":
        raise common.UserError(describe_bad(path, bad) + "\n(fix them, or pass --on-duplicates drop to leave them out)")
    return [r for r in rows if r["_row"] not in why], bad


def describe_bad(path, bad: list[dict], limit: int = 20) -> str:
    lines = [f"  row {b['row']}" + (f" (line {b['line']})" if b["line"] else "") + f": {b['reason']}" for b in bad]
    more = [f"  ... and {len(bad) - limit} more"] if len(bad) > limit else []
    return f"{path}: {len(bad)} bad row(s):\n" + "\n".join(lines[:limit] + more)


def geometry(args) -> dict:
    """Target clip size from the flags or the backbone's config, checked before anything is loaded.
    (Wan's VAE: 4x temporal, 8x spatial; the 2x2 patch: sizes are multiples of 16. common.backbone_geometry
    repeats this check with the loaded pipeline.)"""
    cfg = common.backbone_config(args.backbone)
    h, w, f = args.height or cfg["height"], args.width or cfg["width"], args.num_frames or cfg["num_frames"]
    if (f - 1) % 4 or h % 16 or w % 16 or min(h, w, f) <= 0:
        raise common.UserError(f"video {f}x{h}x{w}: --num-frames must be 4k+1 and --height/--width multiples of 16", 2)
    if not 0 < args.fps < float("inf"):
        raise common.UserError(f"--fps must be a finite number > 0, got {args.fps}", 2)
    return dict(height=h, width=w, num_frames=f,
                max_sequence_length=args.max_sequence_length or cfg["max_sequence_length"])


# ----------------------------------------------------------------------------------------------
# Resumable writing
# ----------------------------------------------------------------------------------------------
def fingerprint(args, kind: str, geo: dict, rows: list[dict]) -> dict:
    """What a resumed run must share with the first one; shards are numbered over the same good rows."""
    plan = hashlib.sha256(json.dumps([[r["_row"], r["prompt"], [str(v) for v in r["videos"]], r.get("target")]
                                      for r in rows]).encode()).hexdigest()
    return dict(input=str(Path(args.input).resolve()), kind=kind, pair_label=args.pair_label, backbone=args.backbone,
                fps=args.fps, shard_size=args.shard_size, latent_dtype=args.latent_dtype, rows=len(rows), plan_sha256=plan,
                **geo)


def open_output(out: Path, fp: dict, replace: bool) -> dict:
    """progress.json of a run with the same fingerprint (resume), or a fresh one. Another run's files are refused,
    or with `replace` (the side folder of --overwrite) deleted."""
    files = [out / "meta.json", out / "prompts.safetensors", out / "bad_rows.json", *out.glob("shard-*.safetensors")]
    progress_file = out / "progress.json"
    same = progress_file.is_file() and json.loads(progress_file.read_text()).get("fingerprint") == fp
    if replace and not same:
        for f in files + [progress_file]:
            f.unlink(missing_ok=True)
    elif progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress.get("fingerprint") != fp:
            old = progress.get("fingerprint", {})
            diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
            raise common.UserError(f"{out}: was prepared with other inputs or settings (differs in {diff}); "
                           f"use another --out-dir, or --overwrite to start again")
        return progress
    elif any(f.exists() for f in files):
        raise common.UserError(f"{out}: already holds dataset files not written by prepare.py; "
                       f"use another --out-dir, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    progress = dict(fingerprint=fp, shards={}, failed=[])  # shards: file name -> the manifest rows in it
    common.save_json(progress, progress_file)
    return progress


def shard_tensors(kind: str, rows: list[dict], latents: list[list[torch.Tensor]] | None, prompt_idx: list[int],
                  video_offset: int = 0) -> dict:
    """The per-row tensors of one shard, in the dtypes the toy world uses. Pairs store each distinct video of the
    shard once (`latents`) and point at it (index_a / index_b, counted over all shards: video_offset before this)."""
    t = dict(prompt_idx=torch.tensor(prompt_idx, dtype=torch.long), row=torch.tensor([r["_row"] for r in rows]))
    if kind == "pairs":
        videos = list(dict.fromkeys(v for r in rows for v in r["videos"]))
        at = {v: video_offset + i for i, v in enumerate(videos)}
        first = {v: z for r, zs in zip(rows, latents) for v, z in zip(r["videos"], zs)}
        t.update(latents=torch.stack([first[v] for v in videos]), pref=torch.tensor([r["target"] for r in rows]).long(),
                 index_a=torch.tensor([at[r["videos"][0]] for r in rows]), index_b=torch.tensor([at[r["videos"][1]] for r in rows]))
    elif latents is not None:
        t["latents"] = torch.stack([z[0] for z in latents])
    if kind in ("binary", "score"):
        t["label" if kind == "binary" else "score"] = torch.tensor([r["target"] for r in rows], dtype=torch.float32)
    return t


def encode_shard(pipe, rows: list[dict], geo: dict, args, failed: list[dict]):
    """Latents of each row's videos (each distinct video encoded once); rows whose video fails to decode go
    to `failed` with --skip-bad, else stop with the row named."""
    videos = list(dict.fromkeys(v for r in rows for v in r["videos"]))
    cache, errors = {}, {}
    read = lambda v: read_video(v, args.fps, geo["num_frames"], geo["height"], geo["width"])
    for v, future in prefetch(read, videos, args.workers):
        try:
            video = future.result()
        except Exception as e:  # decoding failed past the header (truncated file, ...): the row's fault
            errors[v] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            continue
        cache[v] = common.encode_video(pipe, video[None])[0]  # a VAE error (e.g. out of memory) is not: it stops
    kept, latents = [], []
    for r in rows:
        reasons = [errors[v] for v in r["videos"] if v in errors]
        if reasons and not args.skip_bad:
            raise common.UserError(describe_bad(args.input, [dict(row=r["_row"], line=r["_line"], reason="; ".join(reasons))]))
        if reasons:
            failed.append(dict(row=r["_row"], line=r["_line"], reason="; ".join(reasons)))
            continue
        kept.append(r)
        latents.append([cache[v] for v in r["videos"]])
    return kept, latents


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
LATENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(args: Args) -> dict:
    t0 = time.time()
    if not args.input or not args.out_dir:
        raise common.UserError("--input and --out-dir are required (python prepare.py --input manifest.csv "
                               "--out-dir data/name)", 2)
    if args.shard_size < 1:
        raise common.UserError(f"--shard-size must be >= 1, got {args.shard_size}", 2)
    final = Path(args.out_dir)
    # --overwrite writes the new dataset beside the old one and swaps it in only when complete (step 6)
    beside = args.overwrite and final.is_dir() and any(final.iterdir())
    out = final.with_name(final.name + ".new") if beside else final
    geo = geometry(args)
    kind, rows, bad, dropped = plan_rows(args, geo)  # 1) validate every row before any heavy work
    fatal = [b for b in bad if not b.get("dropped")]  # rows left out by --on-duplicates drop are not errors
    if fatal and not args.skip_bad:
        raise common.UserError(describe_bad(args.input, fatal) + "\n(fix them, or pass --skip-bad to leave them out)")
    if not rows:
        raise common.UserError(f"{args.input}: no good rows left" + (f"\n{describe_bad(args.input, bad)}" if bad else ""))
    progress = open_output(out, fingerprint(args, kind, geo, rows), replace=beside)
    with_videos = bool(rows[0]["videos"])
    # "prompts" datasets keep one prompt-table entry per row: dataset.load counts a prompts dataset's
    # rows by its prompt table. The labelled kinds store each distinct prompt once and point at it.
    per_row = kind == "prompts"
    table = list(dict.fromkeys(r["prompt"] for r in rows))
    position = {p: i for i, p in enumerate(table)}

    # 2) the backbone on the CPU (the DiT in bf16, never used here); the VAE, then T5, go to the device
    device = rundir.pick_device(args.device)
    pipe = common.load_backbone(args.backbone, "cpu", None if args.backbone == "tiny" else torch.bfloat16)
    common.backbone_geometry(pipe, geo["height"], geo["width"], geo["num_frames"])  # the authoritative check

    # 3) shards, in order: each written atomically, then recorded with its rows; a rerun skips recorded ones
    chunk = args.shard_size if with_videos else len(rows)
    shards = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    pipe.vae.to(device)
    written = skipped = 0
    failed = list(progress["failed"])
    for s, shard_rows in enumerate(tqdm(shards, desc=f"encode {kind}", unit="shard")):
        name = f"shard-{s:05d}.safetensors"
        done = progress["shards"].get(name)
        if done is not None and (not done or (out / name).is_file()):
            skipped += 1
            continue
        new_failed = []
        kept, latents = encode_shard(pipe, shard_rows, geo, args, new_failed) if with_videos else (shard_rows, None)
        offset = sum(len(progress["shards"][f"shard-{j:05d}.safetensors"]) for j in range(s))
        idx = [offset + i for i in range(len(kept))] if per_row else [position[r["prompt"]] for r in kept]
        if kept:
            counts = progress.setdefault("videos", {})  # videos stored per shard: index_a / index_b count over all
            stored = sum(counts.get(f"shard-{j:05d}.safetensors", 0) for j in range(s))
            tensors = shard_tensors(kind, kept, latents, idx, stored)
            save_shard({k: v.to(LATENT_DTYPES[args.latent_dtype]) if k == "latents" else v for k, v in tensors.items()},
                       out / name)
            counts[name] = len(tensors.get("latents", ()))
        failed += new_failed
        progress["shards"][name], progress["failed"] = [r["_row"] for r in kept], failed
        common.save_json(progress, out / "progress.json")
        written += 1
    if failed or bad:
        common.save_json(sorted(bad + failed, key=lambda b: b["row"]), out / "bad_rows.json")
    kept_rows = [r for name in sorted(progress["shards"]) for r in progress["shards"][name]]
    if not kept_rows:
        raise common.UserError(f"{args.input}: every row failed to decode\n{describe_bad(args.input, failed)}")

    # 4) prompts, encoded once (each distinct prompt once) with T5, which only now goes to the device
    if per_row:
        by_row = {r["_row"]: r["prompt"] for r in rows}
        table = [by_row[r] for r in kept_rows]
    if not ((out / "meta.json").is_file() and (out / "prompts.safetensors").is_file()):  # complete: not redone
        pipe.vae.to("cpu")
        pipe.text_encoder.to(device)
        distinct = list(dict.fromkeys(table))
        n_long = sum(len(ids) > geo["max_sequence_length"] for ids in pipe.tokenizer(distinct).input_ids)
        if n_long:
            print(f"warning: {n_long} prompt(s) longer than {geo['max_sequence_length']} tokens are truncated")
        embeds, mask = common.encode_prompts(pipe, distinct, geo["max_sequence_length"])
        first = {p: i for i, p in enumerate(distinct)}
        where = torch.tensor([first[p] for p in table]) if len(distinct) < len(table) else slice(None)
        common.save_safetensors(dict(prompt_embeds=embeds[where], prompt_mask=mask[where]), out / "prompts.safetensors")
    common.drop_text_encoder(pipe)

    # 5) meta.json last: its presence marks a complete dataset
    n_bad = len(bad) + len(failed)
    meta = dict(kind=kind, prompts=table, source=str(Path(args.input).resolve()), backbone=args.backbone,
                fps=args.fps, n=len(kept_rows), shards=sum(bool(v) for v in progress["shards"].values()),
                bad_rows=n_bad, pair_label=args.pair_label if kind == "pairs" else None,
                dropped_by_vote=dropped, **geo, **({"teacher": args.score_source} if args.score_source else {}))
    common.save_json(meta, out / "meta.json")
    data, _ = dataset.load(out, kind, lazy=True)  # what every method will read; fails loudly if anything is off
    if beside:  # 6) the new dataset is complete and valid: only now does it replace the old one
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old)
        out = final
    summary = dict(out=str(out), kind=kind, rows=len(kept_rows), prompts=len(table), bad_rows=n_bad,
                   shards_written=written, shards_skipped=skipped, seconds=round(time.time() - t0, 1),
                   **target_stats(kind, data))
    if kind == "pairs" and args.pair_label == "prism":
        summary["dropped_by_vote"] = dropped
    if with_videos:
        summary["latent_shape"] = "x".join(map(str, data["latents_a" if kind == "pairs" else "latents"].shape[1:]))
    print(rundir.format_table([summary]))
    if n_bad:
        print(f"{n_bad} bad row(s) left out: {out / 'bad_rows.json'}")
    return summary


def save_shard(tensors: dict, path: Path):
    """Atomic (temp file + rename): an interrupted write never leaves a shard dataset.load would read."""
    common.save_safetensors(tensors, path)


def target_stats(kind: str, data: dict) -> dict:
    if kind == "binary":
        return dict(positive_fraction=data["label"].mean().item())
    if kind == "score":
        return dict(score_mean=data["score"].mean().item(), score_std=data["score"].std(correction=0).item())
    if kind == "pairs":
        return dict(zip(["A_better", "B_better", "ties"], torch.bincount(data["pref"], minlength=3).tolist()))
    return {}


if __name__ == "__main__":
    rundir.cli(main, Args, {})
