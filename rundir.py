"""rundir.py: a run folder and what a long run needs: safe names, checkpoints, resume, signals, pictures.

    Run(method, args, resume)   runs/<method>-<backbone>-<time>[-n]/ (a fresh folder every time) with args.json,
                                metrics.jsonl, summary.json, checkpoints/<stage>.safetensors, videos/, *.png.
                                A run never writes into another run's folder: an existing --out-dir is refused
                                unless --resume, which continues it when the arguments that shape models and data
                                are the same (the ones that differ are named).
    run.steps(stage, total, ...) the optimiser steps of one stage: `for step in run.steps(...)`. It resumes from the
                                stage's checkpoint, saves one every --checkpoint-every steps and after the last, and
                                on SIGINT / SIGTERM saves one, says how to resume and stops (exit 130 / 143).
    plot(...)                   a PNG of curves (matplotlib) in the run folder
A checkpoint is one safetensors file: every trainable tensor of the stage's modules, the optimiser's state, the
RNG states and the loop's own tensors; the rest (step, optimiser hyper-parameters, scheduler) as JSON in its
metadata. No pickle anywhere. Resuming restores all of it, so a resumed run ends bit-identical to an unbroken one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common import GiB, UserError, dist_init, is_main, rank_world, save_json, save_safetensors

# flags that may differ between a run and its --resume (they change when it stops or what it prints, not what it trains)
RESUMABLE = {"resume", "max_steps", "checkpoint_every", "device", "save_videos", "eval_samples", "out_dir"}


class Interrupted(UserError):
    """SIGINT / SIGTERM inside a stage: a checkpoint was saved; the message says how to resume."""


class Run:
    """The run folder (see the module docstring). `args` is the script's Args dataclass (with out_dir, resume)."""

    def __init__(self, method: str, args, out_dir: str | None = None, resume: bool = False):
        self.resume, self.main = resume, is_main()
        failed = None
        if self.main:  # under torchrun, rank 0 makes (or checks) the folder and tells the other ranks its name
            try:
                self._make(method, args, out_dir, resume)
            except UserError as e:
                failed = (str(e), e.code)
        if rank_world()[1] > 1:
            import torch.distributed as dist
            shared = [str(getattr(self, "dir", "")), failed]
            dist.broadcast_object_list(shared, src=0)
            self.dir, failed = Path(shared[0]), shared[1]
        if failed:
            raise UserError(*failed)
        self.metrics = open(self.dir / "metrics.jsonl", "a") if self.main else None

    def _make(self, method, args, out_dir, resume):
        if out_dir:
            self.dir = Path(out_dir)
            if resume:
                self._check_resume(args)
            elif self.dir.exists() and any(self.dir.iterdir()):
                raise UserError(f"--out-dir {self.dir} already holds a run; pass --resume to continue it, or choose "
                                f"another folder (the default is a new one each time)", 2)
            self.dir.mkdir(parents=True, exist_ok=True)
        elif resume:
            raise UserError("--resume needs --out-dir, the folder of the run to continue", 2)
        else:  # a new folder each time: mkdir without exist_ok claims the name even against a parallel start
            stem = f"runs/{method}-{Path(str(args.backbone)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
            Path("runs").mkdir(exist_ok=True)
            for n in range(1000):
                self.dir = Path(stem + (f"-{n}" if n else ""))
                try:
                    self.dir.mkdir()
                    break
                except FileExistsError:
                    continue
        save_json(dataclasses.asdict(args), self.dir / "args.json")

    def _check_resume(self, args):
        if not (self.dir / "args.json").is_file():
            raise UserError(f"--resume: {self.dir} is not a run folder (no args.json)", 2)
        old, new = json.loads((self.dir / "args.json").read_text()), json.loads(json.dumps(dataclasses.asdict(args)))
        differ = sorted(k for k in set(old) | set(new) if k not in RESUMABLE and old.get(k) != new.get(k))
        if differ:
            raise UserError(f"--resume: {self.dir} was started with other arguments: " + ", ".join(
                f"--{k.replace('_', '-')} {old.get(k)} (now {new.get(k)})" for k in differ), 2)

    def log(self, step: int, stage: str, **values):
        if not self.main:
            return
        row = dict(step=step, stage=stage, time=round(time.time(), 3),
                   **{k: (v.item() if torch.is_tensor(v) else v) for k, v in values.items()})
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def summary(self, summary: dict):
        save_json(summary, self.dir / "summary.json")

    def read_metrics(self, stage: str) -> list[dict]:
        """The stage's rows of metrics.jsonl, the last logged row of each step (a resumed run re-logs its steps)."""
        rows = {}
        for line in (self.dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["stage"] == stage:
                rows[row["step"]] = row
        return [rows[k] for k in sorted(rows)]

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_path(self, stage: str) -> Path:
        return self.dir / "checkpoints" / f"{stage}.safetensors"

    def save_checkpoint(self, stage: str, step: int, modules: dict, optimizer=None, scheduler=None,
                        generators: dict | None = None, tensors: dict | None = None):
        """Everything a stage needs to continue exactly: trainable tensors, optimiser, scheduler, RNGs, loop tensors."""
        out, meta = {}, dict(step=step)
        for name, module in modules.items():
            for key, t in trainable_state(module).items():
                out[f"model/{name}/{key}"] = t
        if optimizer is not None:
            state = optimizer.state_dict()
            for i, s in state["state"].items():
                for k, v in s.items():
                    out[f"optim/{i}/{k}"] = torch.as_tensor(v)
            meta["optim_groups"] = state["param_groups"]
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        out["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"rng/cuda{i}"] = s
        for name, g in (generators or {}).items():
            out[f"rng/gen/{name}"] = g.get_state()
        meta["python_rng"], meta["numpy_rng"] = random.getstate(), np.random.get_state()[1:]
        out.update({f"loop/{k}": v for k, v in (tensors or {}).items()})
        save_safetensors(out, self.checkpoint_path(stage), metadata=dict(state=json.dumps(meta, default=_jsonable)))

    def start_step(self, stage: str) -> int:
        """The step run.steps(stage) will start from: the checkpoint's on --resume, else 0 (e.g. for dataset.batches)."""
        path = self.checkpoint_path(stage)
        if not (self.resume and path.is_file()):
            return 0
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])["step"]

    def load_checkpoint(self, stage: str, modules: dict, optimizer=None, scheduler=None,
                        generators: dict | None = None, tensors: dict | None = None) -> int:
        """Restore what save_checkpoint wrote (in place); returns the step, 0 without a checkpoint."""
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return 0
        with safe_open(str(path), "pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["state"])
        for name, module in modules.items():
            own = trainable_state(module)
            for key, t in own.items():
                t.data.copy_(_like(t, saved[f"model/{name}/{key}"]))
        if optimizer is not None:
            state, params = {}, [p for g in optimizer.param_groups for p in g["params"]]
            for k, v in saved.items():
                if k.startswith("optim/"):
                    _, i, key = k.split("/", 2)
                    state.setdefault(int(i), {})[key] = _like(params[int(i)], v) if v.dim() else v
            optimizer.load_state_dict(dict(state=state, param_groups=meta["optim_groups"]))
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(saved["rng/torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([saved[k] for k in sorted(saved) if k.startswith("rng/cuda")])
        for name, g in (generators or {}).items():
            g.set_state(saved[f"rng/gen/{name}"])
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        keys, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for k, t in (tensors or {}).items():
            t.copy_(saved[f"loop/{k}"])
        return meta["step"]

    def steps(self, stage: str, total: int, modules: dict, optimizer=None, scheduler=None, generators=None,
              tensors=None, every: int = 0, stop_at: int | None = None, desc: str | None = None):
        """Yield the steps of `stage` still to run, up to `total` (or `stop_at`, --max-steps). On --resume, first
        restore the stage's checkpoint; save one every `every` steps, after the last step, and on SIGINT/SIGTERM
        (then raise Interrupted, whose message says how to resume)."""
        kw = dict(modules=modules, optimizer=optimizer, scheduler=scheduler, generators=generators, tensors=tensors)
        start = self.load_checkpoint(stage, **kw) if self.resume else 0
        end = min(total, stop_at or total)
        with StopSignals() as stop:
            for step in tqdm(range(start, end), initial=start, total=end, desc=desc or stage, disable=not self.main):
                yield step
                done = step + 1
                if stop.signum or (every and done % every == 0) or done == end:
                    self.save_checkpoint(stage, done, **kw)
                if stop.signum:
                    code = 128 + stop.signum
                    raise Interrupted(f"{signal.Signals(stop.signum).name} at step {done} of stage '{stage}': "
                                      f"checkpoint saved in {self.checkpoint_path(stage)}\nresume with: "
                                      f"python {' '.join(_resume_argv())}", code)


def trainable_state(module: torch.nn.Module) -> dict:
    """The tensors a stage changes: parameters with requires_grad, and every buffer of a module they live in."""
    out = {n: p for n, p in module.named_parameters() if p.requires_grad}
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in out}
    out.update({n: b for n, b in module.named_buffers() if (n.rsplit(".", 1)[0] if "." in n else "") in owners})
    return out


def _like(param, full: torch.Tensor) -> torch.Tensor:
    """A saved whole tensor as `param` holds it: this rank's shard when FSDP2 shards `param` (a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def _jsonable(x):
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def _resume_argv() -> list[str]:
    argv = list(sys.argv)
    return argv if "--resume" in argv else argv + ["--resume"]


class StopSignals:
    """`with StopSignals() as stop:` SIGINT / SIGTERM set stop.signum instead of killing the process, so the loop can
    finish its step and save; a second SIGINT stops at once."""

    def __enter__(self):
        self.signum, self.old = 0, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, as before
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def plot(path, curves: dict, title: str = "", xlabel: str = "step", ylabel: str = "", logy: bool = False):
    """curves {label: (xs, ys)} -> one PNG (matplotlib, no display needed); rank 0 alone under torchrun."""
    if not is_main():
        return path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metrics(run: Run, stage: str, keys: list[str], title: str = "") -> Path:
    """The stage's curves from metrics.jsonl (each key against the step) -> <run>/<stage>.png."""
    if not run.main:
        return run.dir / f"{stage}.png"
    rows = run.read_metrics(stage)
    curves = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
    return plot(run.dir / f"{stage}.png", curves, title or stage)


# ==== The command line: Args (a dataclass of common.arg fields) -> argparse, TINY defaults, `error:` exits
def parse_args(cls, tiny: dict, argv=None):
    """dataclass -> argparse, one --flag per field. `cls`'s defaults are the paper's; on --backbone tiny the
    script's `tiny` dict replaces them (a CPU-sized demo), so a typed value always wins, --help shows the value
    that will run (and the paper's beside it) and args.json records it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(tiny) <= set(fields), f"TINY names unknown fields {set(tiny) - set(fields)}"
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backbone", default=fields["backbone"].default if "backbone" in fields else None)
    on_tiny = pre.parse_known_args(argv)[0].backbone == "tiny"
    p = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, f in fields.items():
        paper = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = tiny[name] if on_tiny and name in tiny else paper
        help = f.metadata.get("help", "").replace("%", "%%")
        if name in tiny:
            help += f" [paper: {paper}; tiny: {tiny[name]}]"
        kw = dict(default=default, help=help, choices=f.metadata.get("choices"))
        flag = "--" + name.replace("_", "-")
        if isinstance(paper, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(paper, (list, tuple)):  # nonempty=True: at least one value
            p.add_argument(flag, nargs="+" if f.metadata.get("nonempty") else "*",
                           type=type(default[0]) if default else str, **kw)
        else:  # a None default (a value read from the checkpoint or data) names its type: arg(None, ..., type=float)
            p.add_argument(flag, type=f.metadata.get("type") or type(paper), **kw)
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    ns = vars(p.parse_args(argv))
    ns.pop("debug")
    for name, value in ns.items():  # every number finite and within the field's min / max (gt: strictly above)
        lo, hi, gt = (fields[name].metadata.get(k) for k in ("min", "max", "gt"))
        for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            if (isinstance(v, float) and not math.isfinite(v) or lo is not None and v < lo or hi is not None and v > hi
                    or gt is not None and v <= gt):
                p.error(f"argument --{name.replace('_', '-')}: {v} is not a finite number in "
                        f"{'(' if gt is not None else '['}{gt if gt is not None else '-inf' if lo is None else lo}, "
                        f"{'inf' if hi is None else hi}]")
    return cls(**ns)


def cli(main, cls, tiny: dict):
    """A script's entry point: main(parse_args(cls, tiny)). A UserError ends as `error: <cause>` with its exit
    code and no traceback (--debug shows it); programming errors keep their traceback."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # what a job scheduler sends: stop as for Ctrl-C
    try:
        return main(parse_args(cls, tiny, [a for a in sys.argv[1:] if a != "--debug"]))
    except UserError as e:  # codes >= 128: a stage stopped by a signal after saving (rundir.Interrupted)
        if "--debug" in sys.argv:
            raise
        print(f"{'error: ' if e.code < 128 else ''}{e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # outside a training step (inside one, rundir saves first)
        print("interrupted: --resume continues from the last checkpoint, if there is one", file=sys.stderr)
        sys.exit(130)


# ==== Timing, statistics, tables, videos: what every script reports
class StepTimer:
    """`with timer:` around each step: seconds per step (the first, warm-up, step left out) and peak memory
    (the CUDA allocator's peak, or the process's peak RSS on a CPU)."""

    def __init__(self, device):
        self.cuda, self.times = torch.device(device).type == "cuda", []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)

    @property
    def seconds_per_step(self) -> float:
        t = self.times[1:] or self.times
        return sum(t) / max(1, len(t))

    def peak_memory_gib(self) -> float:
        import resource  # ru_maxrss: KiB on Linux
        return (torch.cuda.max_memory_allocated() if self.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GiB


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else 0.0


def paired_summary(before: dict, after: dict) -> tuple[dict, list[dict]]:
    """Evaluations before and after fine-tuning on the same prompts and seeds ({metric: [n] tensor}) ->
    ({f"{metric}_before" / "_after" / "_gain": [mean, se]}, table rows); the gain is paired, sample by sample."""
    summary, rows = {}, []
    for key in before:
        for name, x in (("before", before[key]), ("after", after[key]), ("gain", after[key] - before[key])):
            summary[f"{key}_{name}"] = list(mean_se(x))
            rows.append(dict(metric=key, samples=f"{name}{' (paired)' * (name == 'gain')} (n={len(x)})",
                             mean=summary[f"{key}_{name}"][0], se=summary[f"{key}_{name}"][1]))
    return summary, rows


def export_video(video: torch.Tensor, path, fps: int = 8):
    """One video [3, F, H, W] in [-1, 1] -> mp4 (diffusers' export_to_video, imageio-ffmpeg)."""
    from diffusers.utils import export_to_video
    if not is_main():
        return path
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    return path


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain markdown table (also valid for the README)."""
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in cells])


def check_writable(out_dir) -> None:
    """An --out-dir that cannot be written fails before any model loads: a temp file in its nearest existing folder
    (os.access is not enough: as root it calls /sys writable)."""
    import tempfile
    parent = Path(out_dir).absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write in {parent} ({e.strerror})", 2) from None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """--device (auto: CUDA if there is one); under torchrun this rank's device, after joining the process group."""
    return dist_init(device)
