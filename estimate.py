"""estimate.py: GPU memory and FLOPs of real training steps at real scale, without a GPU or weights.

The real code runs on fake tensors (torch's FakeTensorMode: shapes, dtypes, no data) of the real Wan configs
(common.WAN_CONFIGS); a TorchDispatchMode tracks the peak of live tensor storage and counts FLOPs with
PyTorch's own formulas. Used by bench.py (`make bench`) and by each method script's --estimate-memory.

    estimate(fn, *args) / estimate_training_step   peak live bytes + FLOPs of one call (+ AdamW state)
    build_wan_transformer / build_wan_vae          weightless real-size models inside fake_mode()
    transformer_step / rgb_refl_step               the generic LoRA step and the RGB ReFL baseline
    StageEstimates                                 one step of each stage of a method script (--estimate-memory)
Usage: python estimate.py [wan2.1-1.3b] [wan2.1-14b]   (the reference steps)
"""
from __future__ import annotations

import contextlib
import gc
import sys
import time
import weakref

import torch
import torch.utils.flop_counter as flop_counter
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from common import (GiB, backbone_config, add_lora, add_noise, decode_latents, predict_velocity, velocity_target,
                    x0_from_velocity)

# ----------------------------------------------------------------------------------------------
# Memory and FLOPs at real scale without a GPU: the real code on fake tensors
# ----------------------------------------------------------------------------------------------
def fake_mode() -> FakeTensorMode:
    """Tensors (and models) made inside `with fake_mode():` have shapes, dtypes, devices, no data."""
    return FakeTensorMode()


# FlopCounterMode's formulas cover the CUDA attention kernels; on (fake) CPU tensors SDPA runs the CPU
# flash kernel, whose FLOPs are the same. FlopCounterMode itself is not used: the hooks of its module
# tracker keep tensors alive that block checkpointing would free (measured: a 4-block 1.3B LoRA step
# peaks at 14.2 GiB inside it, 5.5 GiB without it).
_FLOP_FORMULAS = {
    **flop_counter.flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_backward_flop_count(
            g.shape, q.shape, k.shape, v.shape),
}


class MemoryFlopMeter(TorchDispatchMode):
    """Peak of live tensor-storage bytes and FLOPs of every op run inside it (real or fake tensors).

    Memory: +size when an op first returns a storage, -size when PyTorch frees it (a weakref callback
    on the storage). Storages are keyed by identity, so views cost nothing. FLOPs: PyTorch's own
    formulas (torch.utils.flop_counter: matmuls, convolutions, attention; elementwise ops count 0).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.flops = {}                      # op name -> FLOPs
        self._seen = WeakIdKeyDictionary()   # storage -> its weakref (whose callback frees the bytes)

    def track(self, t: torch.Tensor):
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = weakref.ref(st, lambda _, n=n: self._free(n))
        self.live += n
        self.peak = max(self.peak, self.live)

    def _free(self, n: int):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            name = str(func._overloadpacket)
            self.flops[name] = self.flops.get(name, 0) + formula(*args, **kwargs, out_val=out)
        if isinstance(out, (torch.Tensor, list, tuple)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out


def _live_tensors(obj, weights: list, inputs: list):
    """Sort what an argument keeps alive into weights (module parameters, buffers, grads) and inputs."""
    if isinstance(obj, torch.nn.Module):
        weights += [p for p in obj.parameters()] + [p.grad for p in obj.parameters() if p.grad is not None]
        weights += list(obj.buffers())
    elif isinstance(obj, torch.optim.Optimizer):
        inputs += [t for s in obj.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    elif isinstance(obj, torch.Tensor):
        inputs.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _live_tensors(o, weights, inputs)
    elif isinstance(obj, dict):
        for o in obj.values():
            _live_tensors(o, weights, inputs)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def estimate(fn, *args, **kwargs) -> dict:
    """Run fn(*args, **kwargs) once, tracking the peak of live tensor bytes and counting FLOPs.

    Live at the start: the distinct storages reachable from the arguments (a module's parameters,
    buffers and grads are "weights", an optimizer's state and plain tensors are "inputs"); everything
    fn allocates is tracked from its first op to its release. Tensors kept alive elsewhere (globals,
    closures) are not counted: pass them as arguments. Works on real tensors as on fake ones; with
    fake arguments, their fake mode is entered for the call.
    Returns dict(peak_bytes, flops, breakdown=dict(weights, inputs, allocated), flops_by_op, seconds,
    cpu_seconds), where `allocated` is the peak of what fn allocated on top of the arguments.
    """
    # Storages held only by reference cycles die when the cyclic GC runs; start from a clean slate so
    # that such frees happen at the same points in a real and in a fake run.
    gc.collect()
    weights, inputs = [], []
    _live_tensors((args, kwargs), weights, inputs)
    mode = torch._guards.detect_fake_mode(weights + inputs)
    meter = MemoryFlopMeter()
    for t in weights + inputs:
        meter.track(t)
    base = meter.live
    w = _storage_bytes(weights)
    t0, c0 = time.perf_counter(), time.process_time()
    with (mode if mode is not None and torch._guards.active_fake_mode() is None else contextlib.nullcontext()), meter:
        fn(*args, **kwargs)
    return dict(peak_bytes=meter.peak, flops=sum(meter.flops.values()), flops_by_op=meter.flops,
                breakdown=dict(weights=w, inputs=base - w, allocated=meter.peak - base),
                seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def estimate_training_step(step_fn, *args, **kwargs) -> dict:
    """estimate() of one forward+backward, plus AdamW state, split into weights / optimizer / activations.

    step_fn runs forward and backward (no optimizer step). AdamW keeps two fp32 moments per trainable
    parameter for the whole run, so 8 bytes per trainable parameter are added to the measured peak.
    weights = all parameter (and buffer) bytes; optimizer = AdamW moments + the grads of the trainable
    parameters; activations = peak - weights - optimizer (saved activations, the step's inputs and
    temporaries). The grads are counted as optimizer state although at the activation peak (start of
    backward) most of them do not exist yet, so `activations` is a slight underestimate, never the peak.
    """
    est = estimate(step_fn, *args, **kwargs)
    modules = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.nn.Module)]
    trainable = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values()
    moments = sum(8 * p.numel() for p in trainable)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    peak = est["peak_bytes"] + moments
    weights = est["breakdown"]["weights"]
    est.update(peak_bytes=peak, trainable_params=sum(p.numel() for p in trainable),
               breakdown=dict(weights=weights, optimizer=moments + grads, activations=peak - weights - moments - grads))
    return est


GPUS = 8  # the N of the per-GPU figure (bench.py --gpus)


def fsdp_per_gpu(est: dict, modules, gpus: int) -> int:
    """Peak bytes per GPU when `gpus` ranks run the step data-parallel with common.shard (FSDP2): every transformer
    block's weights and all trainable state (grads, AdamW moments; heads are sharded whole) split N ways, plus two
    gathered blocks (the one computing and the one prefetched); activations, the VAE and the rest stay per rank."""
    blocks = {id(p): p for m in modules for name, sub in m.named_modules() if name.endswith("blocks")
              and isinstance(sub, torch.nn.ModuleList) for p in sub.parameters()}
    block_bytes = sum(p.numel() * p.element_size() for p in blocks.values())
    largest = max((sum(p.numel() * p.element_size() for p in b.parameters()) for m in modules
                   for name, sub in m.named_modules() if name.endswith("blocks") and isinstance(sub, torch.nn.ModuleList)
                   for b in sub), default=0)
    trainable = {id(p): p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in blocks}
    state = est["breakdown"].get("optimizer", 0)  # grads + moments of every trainable parameter
    spread = block_bytes + sum(p.numel() * p.element_size() for p in trainable.values()) + state
    return int(est["peak_bytes"] - spread * (1 - 1 / gpus) + 2 * largest * (gpus > 1))


def format_estimate(est: dict, label: str = "") -> str:
    """One line: `estimated peak: 14.2 GiB (weights .. + optimizer .. + activations .. GiB), .. TFLOPs  label`."""
    parts = " + ".join(f"{k} {v / GiB:.2f}" for k, v in est["breakdown"].items())
    return (f"estimated peak: {est['peak_bytes'] / GiB:.1f} GiB ({parts} GiB), "
            f"{est['flops'] / 1e12:.1f} TFLOPs  {label}").rstrip()


# ----------------------------------------------------------------------------------------------
# Weightless real-size Wan models, and the two reference training steps
# ----------------------------------------------------------------------------------------------
def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters in dtype except those of the model's _keep_in_fp32_modules, as from_pretrained(torch_dtype=)
    leaves them (Wan: rope, time_embedder, scale_shift_table, norm1-3 stay fp32)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        for pn, p in list(module._parameters.items()):
            want = torch.float32 if any(k in f"{name}.{pn}".split(".") for k in keep) else dtype
            if p is not None and p.dtype != want:
                module._parameters[pn] = torch.nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
    return model


@contextlib.contextmanager
def _meta_if_fake():
    """Inside fake_mode(): build on the meta device, outside the fake mode (no init, no data); else as is.

    peft's LoRA injection calls module.to(), which swaps parameters in place and cannot swap fake
    ones, so a model is built (and LoRA attached) on meta and made fake afterwards (_meta_to_fake).
    """
    if torch._guards.active_fake_mode() is None:
        yield
        return
    with unset_fake_temporarily(), torch.device("meta"):
        yield


def _meta_to_fake(model: torch.nn.Module) -> torch.nn.Module:
    """Replace meta parameters and buffers by CPU tensors made in the active fake mode (shapes only)."""
    if torch._guards.active_fake_mode() is None:
        return model
    made = {}  # a tied parameter (T5's shared token embedding) stays one tensor
    for module in model.modules():
        for n, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                    made[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                module._parameters[n] = made[id(p)]
        for n, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[n] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")
    return model


def _config(backbone) -> dict:
    """common.backbone_config of a name, hub id or diffusers folder (its config files only), or such a dict itself
    (tests shrink one)."""
    return backbone_config(backbone) if isinstance(backbone, str) else backbone


def build_wan_transformer(backbone, dtype=torch.bfloat16, lora_rank: int = 0, gradient_checkpointing: bool = True):
    """WanTransformer3DModel of WAN_CONFIGS[backbone] (a name or such a dict): frozen, in dtype, with
    common.add_lora's adapter (fp32) if lora_rank > 0, block gradient checkpointing if asked.

    Inside `with fake_mode():` this allocates nothing (build the real configs only so: 1.3B is 5.7 GB fp32).
    """
    from diffusers import WanTransformer3DModel
    with _meta_if_fake():
        tr = cast_like_from_pretrained(WanTransformer3DModel(**_config(backbone)["transformer"]), dtype)
        tr.requires_grad_(False)
        if lora_rank:
            add_lora(tr, lora_rank)
        if gradient_checkpointing:
            tr.enable_gradient_checkpointing()
    return _meta_to_fake(tr)


def build_wan_vae(backbone, dtype=torch.bfloat16):
    """AutoencoderKLWan of WAN_CONFIGS[backbone] (a name or such a dict), frozen, in dtype (weightless in
    fake_mode())."""
    from diffusers import AutoencoderKLWan
    with _meta_if_fake():
        vae = cast_like_from_pretrained(AutoencoderKLWan(**_config(backbone)["vae"]), dtype).requires_grad_(False)
    return _meta_to_fake(vae)


def latent_shape(backbone, height=None, width=None, num_frames=None) -> tuple:
    """[16, F', H', W'] of a video (defaults: the backbone's own size); Wan's VAE is 4x in time, 8x in space."""
    cfg = _config(backbone)
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    return (cfg["transformer"]["in_channels"], (f - 1) // 4 + 1, h // 8, w // 8)


def transformer_step(transformer, x0, embeds, sigma: float = 0.5):
    """The generic training step: one flow-matching forward + backward (x_sigma -> v, MSE to eps - x0)."""
    eps = torch.randn_like(x0)
    v = predict_velocity(transformer, add_noise(x0, eps, sigma), sigma, embeds)
    loss = (v - velocity_target(x0, eps)).square().mean()  # = F.mse_loss (whose CPU kernel keeps an [N] buffer)
    loss.backward()
    return loss.detach()


def rgb_refl_step(transformer, vae, x_t, embeds, sigma: float = 0.5, frames: str = "all"):
    """The RGB ReFL baseline: one transformer step with grad, x0 = x_t - sigma v, VAE decode WITH grad,
    a pixel reward, backward through decoder and transformer.

    frames="first" decodes only the first latent frame (Wan's causal VAE maps it to the first video
    frame alone), as PRFL's comparison (ContentV) did. The reward is video.mean(): a stand-in whose
    own memory is not counted (a pixel reward model such as a VLM adds its own, VELR Table 1).
    """
    if frames not in ("all", "first"):
        raise ValueError(f"frames must be 'all' or 'first', got '{frames}'")
    v = predict_velocity(transformer, x_t, sigma, embeds)
    x0 = x0_from_velocity(x_t, v, sigma)
    if frames == "first":
        x0 = x0[:, :, :1]
    video = decode_latents(vae, x0)
    loss = -video.mean()
    loss.backward()
    return loss.detach()


def estimate_transformer_step(backbone="wan2.1-1.3b", height=None, width=None, num_frames=None,
                              lora_rank: int = 64, gradient_checkpointing: bool = True, dtype=torch.bfloat16,
                              batch_size: int = 1) -> dict:
    """estimate_training_step of transformer_step at full size on fake tensors (LoRA, checkpointing, bf16)."""
    cfg = _config(backbone)
    with fake_mode():
        tr = build_wan_transformer(cfg, dtype, lora_rank, gradient_checkpointing)
        x0 = torch.randn(batch_size, *latent_shape(cfg, height, width, num_frames))
        embeds = torch.randn(batch_size, cfg["max_sequence_length"], tr.config.text_dim)
        return estimate_training_step(transformer_step, tr, x0, embeds)


def estimate_rgb_refl_step(backbone="wan2.1-1.3b", height=None, width=None, num_frames=None,
                           frames: str = "all", lora_rank: int = 64, gradient_checkpointing: bool = True,
                           dtype=torch.bfloat16, vae_dtype=torch.bfloat16) -> dict:
    """estimate_training_step of rgb_refl_step (frames "all" or "first") at full size on fake tensors."""
    cfg = _config(backbone)
    with fake_mode():
        tr = build_wan_transformer(cfg, dtype, lora_rank, gradient_checkpointing)
        vae = build_wan_vae(cfg, vae_dtype)
        x_t = torch.randn(1, *latent_shape(cfg, height, width, num_frames))
        embeds = torch.randn(1, cfg["max_sequence_length"], tr.config.text_dim)
        return estimate_training_step(rgb_refl_step, tr, vae, x_t, embeds, frames=frames)


def print_reference_estimates(backbone: str = "wan2.1-1.3b", height=None, width=None, num_frames=None,
                              lora_rank: int = 64) -> dict:
    """Print `estimated peak: X GiB` for the generic LoRA step and the RGB ReFL baseline (all / first frame)."""
    cfg = _config(backbone)
    h, w, f = height or cfg["height"], width or cfg["width"], num_frames or cfg["num_frames"]
    out = {}
    for key, run in [("transformer step", lambda: estimate_transformer_step(cfg, h, w, f, lora_rank)),
                     ("RGB ReFL, all frames", lambda: estimate_rgb_refl_step(cfg, h, w, f, "all", lora_rank)),
                     ("RGB ReFL, first frame", lambda: estimate_rgb_refl_step(cfg, h, w, f, "first", lora_rank))]:
        out[key] = est = run()
        print(format_estimate(est, f"| {key}: {backbone} {h}x{w}x{f}, LoRA r{lora_rank}, bf16, block checkpointing "
                                   f"[{est['seconds']:.0f} s, {est['cpu_seconds']:.0f} s CPU]"), flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# --estimate-memory of the method scripts and bench.py: one step of each stage, as the script runs it
# ----------------------------------------------------------------------------------------------
class _ScalarFakeMode(FakeTensorMode):
    """fake_mode() in which a Python number read from a tensor (.item(), int()) is 0 instead of an error: a step's
    random draw (DiNa's mid step) takes its lowest value. No estimated step branches on tensor data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        return super().__torch_dispatch__(func, types, args, kwargs)


def _modules(*objs) -> list:
    """The modules among objs and among the attributes of the stand-in pipelines among them, each once."""
    from types import SimpleNamespace
    found = {}
    for obj in objs:
        for m in vars(obj).values() if isinstance(obj, SimpleNamespace) else (obj,):
            if isinstance(m, torch.nn.Module):
                found[id(m)] = m
    return list(found.values())


class StageEstimates:
    """`with StageEstimates("PRFL", backbone) as est:` estimates one step of each stage of a method script.

    Build modules (stand-in pipeline, the script's own reward models, adapters, copies) inside
    `est.build(lambda: ...)`, then call `est.step(label, step_fn, *args)` per stage. For a real backbone all
    of it is fake (weightless; transformer in bf16 as on CUDA) and `step` prints estimate_training_step's line
    (train=False: estimate(), no AdamW state). For "tiny" the same code runs on real CPU tensors in fp32 (as the
    scripts run on a CPU): the meter's peak of live tensors is then measured (that run is the warm-up), and the
    step is timed over `steps` more runs. No-grad rollout steps before a gradient window do not change the peak
    (each frees its activations), so a step may skip them: rollout_forwards=n adds the FLOPs of n batch-1
    no-grad forwards of the last built generator, printed (and stored as `rollout_flops`) apart.
    """

    steps = 3  # timed runs of each step on tiny, after the metered one

    def __init__(self, method: str, backbone: str, height=None, width=None, num_frames=None):
        cfg = _config(backbone)
        self.cfg = dict(cfg, height=height or cfg["height"], width=width or cfg["width"],
                        num_frames=num_frames or cfg["num_frames"])
        self.method, self.backbone = method, backbone
        self.real = backbone == "tiny"
        self.mode = contextlib.nullcontext() if self.real else _ScalarFakeMode()
        self.dtype = torch.float32 if self.real else torch.bfloat16
        self.results, self._forward_flops, self.pipe = {}, {}, None
        c = self.cfg
        self.size = f"{backbone} {c['height']}x{c['width']}x{c['num_frames']}"

    def __enter__(self):
        import warnings  # bf16 autocast on CPU: fp32 norm weights take the unfused kernel (so does CUDA's autocast)
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        gc.collect()
        gc.freeze()  # estimate()'s gc.collect() then skips the ~1M objects of torch & co. (0.25 s a call)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        gc.unfreeze()
        return self.mode.__exit__(*exc)

    def build(self, fn):
        """fn() builds modules; each module in its result (a tuple, or a pipeline's attributes) becomes fake."""
        torch.manual_seed(0)
        with _meta_if_fake():
            out = fn()
        for m in _modules(*(out if isinstance(out, tuple) else (out,))):
            _meta_to_fake(m)
        return out

    def pipeline(self, lora_rank: int = 0, gradient_checkpointing: bool = True, vae_dtype=torch.float32):
        """Inside build(): what load_backbone(backbone) puts on the GPU (a frozen transformer, LoRA if lora_rank; the
        VAE, fp32 as loaded) and what backbone_geometry reads. Every later step counts its weights as live."""
        from types import SimpleNamespace
        self.generator = build_wan_transformer(self.cfg, self.dtype, lora_rank, gradient_checkpointing)
        self.pipe = SimpleNamespace(transformer=self.generator, vae=build_wan_vae(self.cfg, vae_dtype),
                                    text_encoder=None, backbone_name=self.backbone, wan_config=self.cfg,
                                    vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)
        return self.pipe

    def load_phase(self, prompts: int = 16) -> dict:
        """The load phase as the scripts run it: load_backbone's DiT (bf16) and VAE (fp32) resident with the text encoder
        (in the DiT's dtype), encoding a batch of `prompts` prompts of max_sequence_length tokens (no grad)."""
        from transformers import UMT5Config, UMT5EncoderModel

        def build():
            te = UMT5EncoderModel(UMT5Config(**self.cfg["text_encoder"])).to(self.dtype).requires_grad_(False)
            return build_wan_transformer(self.cfg, self.dtype, 0, False), build_wan_vae(self.cfg, torch.float32), te

        L = self.cfg["max_sequence_length"]
        ids, mask = torch.zeros(prompts, L, dtype=torch.long), torch.ones(prompts, L, dtype=torch.long)
        est = estimate(torch.no_grad()(lambda tr, vae, te, i, m: te(i, m).last_hidden_state), *self.build(build), ids, mask)
        return self.report(f"load phase (DiT + VAE resident, text encoder encoding {prompts} prompts)", est)

    def inputs(self, batch: int = 1):
        """Latents [B, 16, F', H', W'], text embeddings [B, L, text_dim] (fp32, as cached) and mask [B, L]."""
        L = self.cfg["max_sequence_length"]
        return (torch.randn(batch, *latent_shape(self.cfg)), torch.randn(batch, L, self.cfg["transformer"]["text_dim"]),
                torch.ones(batch, L, dtype=torch.bool))

    def step(self, label: str, fn, *args, train: bool = True, rollout_forwards: float = 0, quiet: bool = False,
             **kwargs) -> dict:
        """Estimate (and on tiny also time) fn(*args, **kwargs); print one `estimated peak:` line."""
        mods = _modules(self.pipe, *args, *kwargs.values())
        for m in mods:
            m.zero_grad(set_to_none=True)
        # modules (also a pipeline's) as top-level arguments: their weights are live and their trainable
        # parameters get AdamW state; args and kwargs as arguments: their tensors are live from the start
        est = (estimate_training_step if train else estimate)(lambda *_: fn(*args, **kwargs), *mods, args, kwargs)
        if self.real:  # the metered run was the warm-up
            t0 = time.perf_counter()
            for _ in range(self.steps):
                fn(*args, **kwargs)
            est["seconds_per_step"] = (time.perf_counter() - t0) / self.steps
        for m in mods:
            m.zero_grad(set_to_none=True)
        est["per_gpu_bytes"], est["gpus"] = fsdp_per_gpu(est, mods, GPUS), GPUS
        if rollout_forwards:
            key = id(self.generator)
            if key not in self._forward_flops:
                x, e, _ = self.inputs()
                self._forward_flops[key] = estimate(torch.no_grad()(predict_velocity), self.generator, x, 0.5, e)["flops"]
            est["rollout_flops"] = rollout_forwards * self._forward_flops[key]
        return est if quiet else self.report(label, est)

    def report(self, label: str, est: dict) -> dict:
        """Print est's `estimated peak:` line (and, on tiny, the measured time) and keep it under label."""
        extra = (f" (+ {est['rollout_flops'] / 1e12:.0f} TFLOPs of no-grad rollout forwards, not run)"
                 if est.get("rollout_flops") else "")
        print(format_estimate(est, f"| {self.method} {label}: {self.size}{extra} [{est['seconds']:.0f} s]"), flush=True)
        if "per_gpu_bytes" in est and not self.real:
            print(f"    per GPU with torchrun on {est['gpus']} GPUs (FSDP2, batch 1 each): "
                  f"{est['per_gpu_bytes'] / GiB:.1f} GiB", flush=True)
        if "seconds_per_step" in est:
            print(f"    measured on the CPU: {est['seconds_per_step'] * 1e3:.1f} ms/step ({self.steps} steps after a "
                  f"warm-up), peak of live tensors {est['peak_bytes'] / 2**20:.2f} MiB", flush=True)
        self.results[label] = est
        return est


def extrapolate(est: dict, lo: dict, hi: dict, n: float) -> dict:
    """est + (n - 1) (hi - lo) in peak, breakdown, FLOPs and times: the cost of a step that grows linearly in a
    count (VELR's K steps with gradient: each keeps its checkpointed block inputs for the backward), from runs
    at count 1 (lo) and 2 (hi); est is a run at count 1 (lo itself, or a variant with the same count)."""
    lin = lambda key, d=est, a=lo, b=hi: d[key] + (n - 1) * (b[key] - a[key])
    out = dict(est, peak_bytes=lin("peak_bytes"), flops=lin("flops"), seconds=est["seconds"] + hi["seconds"],
               breakdown={k: lin(k, est["breakdown"], lo["breakdown"], hi["breakdown"]) for k in est["breakdown"]})
    for key in ("seconds_per_step", "per_gpu_bytes"):
        if key in est:
            out[key] = lin(key)
    return out


def window_checkpointing_costs(est: dict, lo: dict, hi: dict, n: int) -> dict:
    """VELR's --window-checkpointing: {option: (cost, extra)} of a step with n steps with gradient, extrapolated from
    est and lo (count 1, lo keeps everything) and hi = {"none": .., "step": ..} (count 2). none: all kept on the GPU
    (extra 0); step: extra = the FLOPs recomputed in the backward; offload: none's FLOPs with est's memory (the n - 1
    window steps' tensors go to the CPU: arithmetic, fake tensors cannot move), extra = the bytes moved there."""
    x = {keep: extrapolate(est, lo, hi[keep], n) for keep in ("none", "step")}
    offload = dict(x["none"], **{k: est[k] for k in ("peak_bytes", "breakdown", "per_gpu_bytes")})
    return dict(step=(x["step"], x["step"]["flops"] - x["none"]["flops"]), none=(x["none"], 0),
                offload=(offload, (n - 1) * (hi["none"]["peak_bytes"] - lo["peak_bytes"])))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["wan2.1-1.3b"]:
        print_reference_estimates(name)
