"""Tests of common.py: backbone, flow matching, rollout window, DiT prefix, LoRA, data, toy world."""
import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import common as C
import rundir
import dataset
import toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pipe():
    return C.load_backbone("tiny")


def _inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *C.backbone_geometry(pipe)["latent_shape"], generator=g)
    e, _ = C.encode_prompts(pipe, ["a red square moving left", "a blue box moving up"][:batch])
    return x, e


# ---------------------------------------------------------------- backbone
def test_tiny_backbone_is_deterministic_and_has_12_blocks(pipe):
    other = C.load_backbone("tiny")
    assert len(pipe.transformer.blocks) >= 12
    for (n, a), (_, b) in zip(pipe.transformer.state_dict().items(), other.transformer.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


def test_tiny_pipeline_runs_end_to_end(pipe):
    out = pipe("a red square moving left", height=32, width=32, num_frames=9, num_inference_steps=2,
               output_type="pt", max_sequence_length=32).frames
    assert out.shape == (1, 9, 3, 32, 32)


def test_saved_tiny_pipeline_loads_back_through_the_real_loader(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny-wan")
    loaded = C.load_backbone(str(tmp_path / "tiny-wan"))
    x, e = _inputs(pipe)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(x, t, e).sample, loaded.transformer(x, t, e).sample)
        assert torch.allclose(C.decode_latents(pipe, x), C.decode_latents(loaded, x))


def test_real_id_without_network_gives_a_short_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = "import common\ntry:\n    common.load_backbone('wan2.1-1.3b')\nexcept common.UserError as e:\n    print(e)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # a UserError (printed as `error: ...` by every script), not a crash
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in r.stdout and "--backbone" in r.stdout
    assert "hf download" in r.stdout


def test_a_missing_local_folder_is_named_without_hub_advice(tmp_path):
    with pytest.raises(C.UserError, match="nor a diffusers Wan folder") as e:
        C.load_backbone(str(tmp_path / "no-such-folder"))
    assert "hub" not in str(e.value)


def test_known_configs_give_paper_shapes():
    import diffusers
    cfg = C.WAN_CONFIGS["wan2.1-1.3b"]["transformer"]
    with torch.device("meta"):
        tr = diffusers.WanTransformer3DModel(**cfg)
    n = sum(p.numel() for p in tr.parameters())
    assert 1.40e9 < n < 1.44e9  # Wan2.1-T2V-1.3B: 1.419B parameters
    # 480x832x81 -> latent (16, 21, 60, 104) -> 21*30*52 = 32,760 tokens
    f, h, w = 81, 480, 832
    assert ((f - 1) // 4 + 1) * (h // 16) * (w // 16) == 32760


# ---------------------------------------------------------------- flow matching
def test_shift_sigma_values():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(C.shift_sigma(s, 1.0), s)
    assert torch.allclose(C.shift_sigma(s, 5.0), torch.tensor([0.0, 2.5 / 3.0, 1.0]))
    sig = C.sigma_schedule(40, 5.0)
    assert len(sig) == 41 and sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()


def test_noising_velocity_and_euler_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, 2, generator=g), torch.randn(3, 4, 2, 2, 2, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    xt = C.add_noise(x0, eps, sigma)
    v = C.velocity_target(x0, eps)
    assert torch.allclose(C.x0_from_velocity(xt, v, sigma), x0, atol=1e-6)
    # on the straight path, one Euler step with the true velocity lands exactly on x_{sigma'}
    nxt = torch.tensor([0.3, 0.1, 0.0])
    assert torch.allclose(C.euler_step(xt, v, sigma, nxt), C.add_noise(x0, eps, nxt), atol=1e-6)
    assert torch.allclose(C.add_noise(x0, eps, 1.0), eps) and torch.allclose(C.add_noise(x0, eps, 0.0), x0)


def test_train_sigma_range_and_shift():
    s1 = C.sample_train_sigma(4000, 1.0, torch.Generator().manual_seed(0))
    s5 = C.sample_train_sigma(4000, 5.0, torch.Generator().manual_seed(0))
    assert 0 < s1.min() and s1.max() <= 1 and abs(s1.mean() - 0.5) < 0.03
    assert s5.mean() > s1.mean() + 0.15  # shift 5 puts more mass at high noise


# ---------------------------------------------------------------- rollout
def test_rollout_without_window_matches_diffusers_euler_sampler(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler
    x, e = _inputs(pipe)
    sigmas = C.sigma_schedule(8, 3.0)
    ours, _ = C.rollout(pipe.transformer, x, e, sigmas)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].tolist())
    ref = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = pipe.transformer(ref, t.expand(2), e).sample
            ref = sched.step(v, t, ref).prev_sample
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_rollout_gradient_only_through_the_window(pipe):
    tr = pipe.transformer
    params = C.add_lora(tr, 4, adapter_name="policy")
    for p in params:  # make the adapter non-zero so that its gradient is informative
        torch.nn.init.normal_(p, std=0.05)
    x, e = _inputs(pipe)
    sigmas = C.sigma_schedule(8, 3.0)
    grad_calls = []
    h = tr.register_forward_hook(lambda m, i, o: grad_calls.append(torch.is_grad_enabled()))
    out, _ = C.rollout(tr, x, e, sigmas, start=0, stop=6, grad_steps=[3, 4])
    h.remove()
    assert grad_calls == [False, False, False, True, True, False]
    out.pow(2).mean().backward()
    g_window = [p.grad.clone() for p in params]
    assert all(torch.isfinite(g).all() for g in g_window) and sum(g.abs().sum() for g in g_window) > 0
    # the same gradient from an explicit construction: constants before step 3, grad in 3..4,
    # then step 5 with a detached velocity
    for p in params:
        p.grad = None
    with torch.no_grad():
        z, _ = C.rollout(tr, x, e, sigmas, 0, 3)
    for i in (3, 4):
        z = C.euler_step(z, C.predict_velocity(tr, z, sigmas[i], e), sigmas[i], sigmas[i + 1])
    with torch.no_grad():
        v5 = C.predict_velocity(tr, z, sigmas[5], e)
    C.euler_step(z, v5, sigmas[5], sigmas[6]).pow(2).mean().backward()
    for a, p in zip(g_window, params):
        assert torch.allclose(a, p.grad, atol=1e-6)
    # an empty window gives no graph at all
    out, _ = C.rollout(tr, x, e, sigmas, 0, 6)
    assert not out.requires_grad


def test_rollout_cfg_uses_negative_embeds(pipe):
    x, e = _inputs(pipe)
    sig = C.sigma_schedule(4, 3.0)
    neg = torch.zeros_like(e)
    a, _ = C.rollout(pipe.transformer, x, e, sig, guidance_scale=1.0)
    b, _ = C.rollout(pipe.transformer, x, e, sig, guidance_scale=5.0, negative_embeds=neg)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------- DiT prefix
def test_prefix_features_equal_full_forward_hidden_states(pipe):
    tr = pipe.transformer
    x, e = _inputs(pipe)
    t = torch.tensor([700.0, 300.0])
    seen = {}
    hooks = [tr.blocks[k - 1].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k in (4, 8, 12)]
    with torch.no_grad():
        tr(x, t, e)
        feats = C.dit_prefix_features(tr, x, t, e, taps=(4, 8, 12))
    for h in hooks:
        h.remove()
    for k, h in zip((4, 8, 12), feats["hidden"]):
        assert torch.equal(h, seen[k])
    f, hh, ww = feats["grid"]
    assert feats["hidden"][0].shape == (2, f * hh * ww, tr.config.num_attention_heads * tr.config.attention_head_dim)
    assert feats["text"].shape[:2] == e.shape[:2] and feats["temb"].shape[0] == 2


def test_prefix_stops_early(pipe):
    tr = pipe.transformer
    calls = []
    for i, b in enumerate(tr.blocks):
        b.register_forward_hook(lambda m, inp, o, i=i: calls.append(i))
    x, e = _inputs(pipe)
    with torch.no_grad():
        C.dit_prefix_features(tr, x, torch.tensor([500.0, 500.0]), e, taps=(3,))
    assert calls == [0, 1, 2]


# ---------------------------------------------------------------- LoRA
def test_saved_lora_loads_into_a_wan_pipeline_and_changes_output(pipe, tmp_path):
    params = C.add_lora(pipe.transformer, 4, alpha=8, adapter_name="policy")  # alpha != r must survive
    base = {n: p.clone() for n, p in pipe.transformer.named_parameters() if "lora" not in n}
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    path = C.save_lora(pipe.transformer, tmp_path, "policy")
    assert path.name == "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    fresh = C.load_backbone("tiny")
    x, e = _inputs(fresh)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        before = fresh.transformer(x, t, e).sample
        fresh.load_lora_weights(str(tmp_path))
        after = fresh.transformer(x, t, e).sample
        ours = pipe.transformer(x, t, e).sample
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ours, atol=1e-5)
    for n, p in pipe.transformer.named_parameters():  # adding/initialising LoRA never touched the base
        if "lora" not in n:
            assert torch.equal(p, base[n]), n


def test_lora_restricted_to_blocks(pipe):
    C.add_lora(pipe.transformer, 4, adapter_name="reward", blocks=[0, 1])
    names = [n for n, _ in pipe.transformer.named_parameters() if "lora_A.reward" in n]
    assert names and all(n.startswith(("blocks.0.", "blocks.1.")) for n in names)
    assert any(".attn2." in n for n in names)


# ---------------------------------------------------------------- data
def _toy_tensors(n=4, p=2):
    return dict(prompt_embeds=torch.randn(p, 5, 8), prompt_mask=torch.ones(p, 5, dtype=torch.bool),
                prompt_idx=torch.arange(n) % p, latents=torch.randn(n, 16, 1, 2, 2), label=torch.ones(n))


def test_dataset_roundtrip(tmp_path):
    t = _toy_tensors()
    dataset.save(tmp_path / "d", t, dict(kind="binary", prompts=["a", "b"]))
    data, meta = dataset.load(tmp_path / "d", "binary")
    assert meta["prompts"] == ["a", "b"]
    for k in t:
        assert torch.equal(data[k], t[k])
    assert not list((tmp_path / "d").glob("*.tmp"))


@pytest.mark.parametrize("problem, message", [
    ("missing", "no meta.json"), ("kind", "needs 'pairs'"), ("nan", "NaN"), ("rows", "rows"),
    ("empty", "empty"), ("key", "missing"), ("idx", "prompt_idx"), ("negative_idx", r"prompt_idx .*rows \[1\]"),
    ("meta_json", "meta.json: not valid JSON"), ("corrupt_shard", "shard-00000.safetensors: not a readable")])
def test_dataset_bad_input_is_named(tmp_path, problem, message):
    t = _toy_tensors()
    kind = "binary"
    if problem == "nan":
        t["latents"][2, 0, 0, 0, 0] = float("nan")
    elif problem == "rows":
        t["label"] = torch.ones(3)
    elif problem == "empty":
        t = dict(t, latents=torch.zeros(0, 16, 1, 2, 2), label=torch.zeros(0), prompt_idx=torch.zeros(0, dtype=torch.long))
    elif problem == "key":
        del t["label"]
    elif problem == "idx":
        t["prompt_idx"] = torch.tensor([0, 1, 2, 3])
    elif problem == "negative_idx":  # -1 would silently index the last prompt
        t["prompt_idx"] = torch.tensor([0, -1, 1, 0])
    if problem != "missing":
        dataset.save(tmp_path / "d", t, dict(kind=kind, prompts=["a", "b"]))
    if problem == "meta_json":
        (tmp_path / "d" / "meta.json").write_text("{kind: binary")
    if problem == "corrupt_shard":
        (tmp_path / "d" / "shard-00000.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(C.UserError, match=message):
        dataset.load(tmp_path / "d", "pairs" if problem == "kind" else None)


def test_check_latent_shape(pipe):
    dataset.check_latent_shape(torch.zeros(2, 16, 3, 4, 4), pipe, "x")
    with pytest.raises(C.UserError, match=r"\(2, 4, 3, 4, 4\)"):
        dataset.check_latent_shape(torch.zeros(2, 4, 3, 4, 4), pipe, "x")


# ---------------------------------------------------------------- toy world
def test_toy_reward_depends_on_prompt_and_motion():
    clips = toy.make_toy_clips(8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red square moving right"] * 8
    r = toy.toy_reward(clips, prompts)
    assert not torch.allclose(r, toy.toy_reward(clips, ["a blue square moving right"] * 8))
    assert not torch.allclose(r, toy.toy_reward(clips, ["a red square moving left"] * 8))
    assert not torch.allclose(r, toy.toy_reward(clips.flip(2), prompts))  # time reversed: motion reversed
    # a red square that moves right scores higher than the same square moving left, or standing still
    v = torch.full((1, 3, 9, 32, 32), -0.8)
    for f in range(9):
        v[0, :, f, 12:20, 4 + 2 * f:12 + 2 * f] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    right, left, still = (toy.toy_reward(x, prompts[:1]) for x in (v, v.flip(2), v[:, :, :1].expand_as(v)))
    assert right > still + 0.5 and still > left + 0.5
    # one frame cannot score it: a single repeated frame has no motion term at all
    assert abs(toy.toy_reward(v[:, :, :1].expand_as(v), prompts[:1]) - toy.toy_reward(v[:, :, 4:5].expand_as(v), prompts[:1])) < 1e-5


def _reconstruction_agreement(pipe, n=32):
    """Correlation between the toy reward of clips and of their VAE reconstructions (random prompts)."""
    g = torch.Generator().manual_seed(5)
    clips = toy.make_toy_clips(n, generator=g)
    prompts = [toy.toy_prompts()[i] for i in torch.randint(0, 36, (n,), generator=g)]
    with torch.no_grad():
        rec = C.decode_latents(pipe, C.encode_video(pipe, clips))
    return torch.corrcoef(torch.stack([toy.toy_reward(clips, prompts), toy.toy_reward(rec, prompts)]))[0, 1].item()


def test_fitted_tiny_vae_keeps_what_the_toy_reward_sees(pipe):
    # the point of fitting: decode(encode(clip)) scores like the clip, so the true reward of a latent means something
    assert toy.TINY_WEIGHTS.is_file()
    assert _reconstruction_agreement(pipe) > 0.8
    random = toy.build_tiny_pipeline(weights=None)  # the same architecture unfitted: its decode is unrelated to its input
    assert _reconstruction_agreement(random) < 0.5
    # the fitted latent statistics normalise latents to about unit scale
    z = C.encode_video(pipe, toy.make_toy_clips(32))
    assert 0.5 < z.std().item() < 2 and z.mean().abs().item() < 0.3


def test_fitted_tiny_generator_follows_its_prompt_partly(pipe):
    prompts = toy.toy_prompts("eval")  # 'patch' prompts: the same colours and directions as in training
    embeds, _ = C.encode_prompts(pipe, prompts * 4)
    z = C.sample_latents(pipe, embeds, list(range(4 * len(prompts))), num_steps=20)
    own = toy.true_reward(pipe, z, prompts * 4)
    # the same videos scored for the prompt of the next colour, same direction
    swapped = [p.replace("red", "@").replace("green", "red").replace("blue", "green").replace("@", "blue") for p in prompts]
    other = toy.true_reward(pipe, z, swapped * 4)
    assert own.mean() > other.mean() + 0.1  # measured: 0.51 vs 0.27 (a random generator: no difference)
    assert own.std() > 0.2  # and not always: fine-tuning has something to improve


def test_toy_reward_is_differentiable():
    v = toy.make_toy_clips(2).requires_grad_(True)
    toy.toy_reward(v, ["a green box moving up", "a red block moving down"]).sum().backward()
    assert v.grad.abs().sum() > 0


def test_toy_prompts_held_out_and_parse():
    train, test = toy.toy_prompts("train"), toy.toy_prompts("eval")
    assert not set(train) & set(test) and len(test) >= 12
    assert toy.parse_toy_prompt("a blue patch moving up") == (2, (0.0, -1.0))
    with pytest.raises(ValueError, match="no colour"):
        toy.parse_toy_prompt("a cat")


@pytest.mark.parametrize("kind", ["binary", "score", "pairs"])
def test_toy_dataset_kinds(pipe, kind, tmp_path):
    data, meta = toy.toy_dataset(pipe, kind, 16, cache_dir=tmp_path)
    folder, = tmp_path.glob(f"{kind}-16-0-*")  # cached on disk (keyed by the weights), same layout as real data
    again, _ = dataset.load(folder, kind)
    for k in data:
        assert torch.equal(data[k], again[k])
    lat = data["latents" if kind != "pairs" else "latents_a"]
    assert lat.shape == (16, *C.backbone_geometry(pipe)["latent_shape"])
    if kind == "binary":
        assert 0 < data["label"].mean() < 1
    if kind == "pairs":
        assert set(data["pref"].tolist()) <= {0, 1, 2}
        assert ((data["reward_a"] > data["reward_b"] + 0.1) == (data["pref"] == 0)).all()
    if kind == "score":  # the score is the true reward of the latent under its prompt
        names = [meta["prompts"][i] for i in data["prompt_idx"][:4]]
        assert torch.allclose(toy.true_reward(pipe, lat[:4], names), data["score"][:4], atol=1e-5)


def test_toy_dataset_is_the_same_whatever_the_thread_count(pipe, tmp_path):
    """CPU float sums depend on the thread count, and a sampled toy latent amplifies them (a 2-thread cache once
    gave DiNa-LRM a reward model 0.04 less accurate); toy_dataset builds with one thread, so every machine's is alike."""
    built = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            built[threads] = toy.toy_dataset(pipe, "score", 16, cache_dir=tmp_path / str(threads))[0]
        finally:
            torch.set_num_threads(1)
    assert all(torch.equal(built[1][k], built[2][k]) for k in built[1])


def test_a_binary_toy_set_read_off_cached_pairs_equals_one_built_alone(pipe, tmp_path):
    """PRFL's binary toy set is taken from PRISM's / DiNa-LRM's pairs set when that is cached (the demo builds it
    once): it must be the set a fresh build gives, tensor for tensor, with a label of each class."""
    alone, meta = toy.toy_dataset(pipe, "binary", 16, cache_dir=tmp_path / "alone")
    toy.toy_dataset(pipe, "pairs", 16, cache_dir=tmp_path / "shared")
    reused, meta2 = toy.toy_dataset(pipe, "binary", 16, cache_dir=tmp_path / "shared")
    assert alone.keys() == reused.keys() and all(torch.equal(alone[k], reused[k]) for k in alone), alone.keys()
    assert meta == meta2 and 0 < reused["label"].mean() < 1
    folder, = (tmp_path / "shared").glob("binary-16-0-*")
    assert all(torch.equal(v, dataset.load(folder, "binary")[0][k]) for k, v in reused.items())  # cached as a set


# ---------------------------------------------------------------- plumbing
@dataclasses.dataclass
class _Args:
    lr: float = C.arg(1e-4, "learning rate")
    steps: int = C.arg(3, "steps")
    lora: bool = C.arg(True, "use LoRA")
    taps: tuple = C.arg((4, 8), "taps")
    name: str = C.arg("x", "a name", choices=["x", "y"])


def test_parse_args():
    a = rundir.parse_args(_Args, {}, ["--lr", "0.5", "--no-lora", "--taps", "1", "2", "3", "--name", "y"])
    assert a.lr == 0.5 and a.steps == 3 and a.lora is False and list(a.taps) == [1, 2, 3] and a.name == "y"
    with pytest.raises(SystemExit):
        rundir.parse_args(_Args, {}, ["--name", "z"])


@dataclasses.dataclass
class _BackboneArgs:
    backbone: str = C.arg("tiny", "backbone")
    lr: float = C.arg(1e-4, "paper lr")
    steps: int = C.arg(1000, "paper steps")


def test_tiny_dict_becomes_the_defaults_on_tiny_only_and_typed_values_win(capsys):
    tiny = dict(lr=1e-2, steps=5)
    a = rundir.parse_args(_BackboneArgs, tiny, [])
    assert (a.lr, a.steps) == (1e-2, 5)
    # typed on tiny: the typed value wins, even when it equals the paper's default
    a = rundir.parse_args(_BackboneArgs, tiny, ["--lr", "1e-4", "--steps", "7"])
    assert (a.lr, a.steps) == (1e-4, 7)
    a = rundir.parse_args(_BackboneArgs, tiny, ["--backbone", "wan2.1-1.3b"])
    assert (a.lr, a.steps) == (1e-4, 1000)
    a = rundir.parse_args(_BackboneArgs, tiny, ["--backbone=some/folder", "--steps", "3"])
    assert (a.lr, a.steps) == (1e-4, 3)
    with pytest.raises(SystemExit):  # --help shows the effective value and the paper's beside it
        rundir.parse_args(_BackboneArgs, tiny, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 5)" in out and "[paper: 1000; tiny: 5]" in out


@dataclasses.dataclass
class _RangeArgs:
    steps: int = C.arg(10, "steps", min=1)
    lr: float = C.arg(1e-4, "lr", gt=0)
    edges: list = C.arg(None, "edges", factory=lambda: [0.0, 1.0], min=0, max=1, nonempty=True)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--lr", "nan"], ["--lr", "inf"],
                                  ["--lr", "-1e-3"], ["--lr", "0"], ["--edges", "0", "1.5"], ["--edges"]])
def test_parse_args_refuses_out_of_range_and_non_finite_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rundir.parse_args(_RangeArgs, {}, argv)
    assert e.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err
    assert rundir.parse_args(_RangeArgs, {}, ["--steps", "1", "--lr", "1e-9", "--edges", "0", "1"]).steps == 1


def test_cli_prints_user_errors_without_traceback(cli):
    """rundir.cli, run in this process as a script's `__main__` line runs it (conftest's `cli`; a subprocess only
    added 2.7 s of imports): a UserError ends as one `error:` line and its exit code; with --debug, and for a
    programming error, the exception escapes rundir.cli, which a process prints as a Traceback and exit status 1."""
    @dataclasses.dataclass
    class Args:
        backbone: str = C.arg("tiny", "b")
        n: int = C.arg(1, "n")

    def main(args):
        if args.n < 1:
            raise C.UserError(f"--n {args.n}: must be >= 1", code=2)
        raise RuntimeError("a bug")

    script = types.SimpleNamespace(__name__="s", main=main, Args=Args, TINY={})
    code, _, err = cli(script, ["--n", "0"])
    assert code == 2 and "error: --n 0: must be >= 1" in err and "Traceback" not in err
    with pytest.raises(C.UserError, match="--n 0: must be >= 1"):  # --debug: its traceback
        cli(script, ["--n", "0", "--debug"])
    with pytest.raises(RuntimeError, match="a bug"):  # a programming error keeps its traceback
        cli(script, [])


def test_run_dir_and_atomic_checkpoint(tmp_path):
    run = rundir.Run("m", _Args(), out_dir=tmp_path / "run")
    run.log(1, "rm", loss=torch.tensor(0.5))
    run.summary(dict(acc=0.9))
    C.save_safetensors(dict(w=torch.ones(2)), run.dir / "ckpt.safetensors")
    files = sorted(p.name for p in run.dir.iterdir())
    assert files == ["args.json", "ckpt.safetensors", "metrics.jsonl", "summary.json"]
    assert '"loss": 0.5' in (run.dir / "metrics.jsonl").read_text()


def test_mean_se():
    m, se = rundir.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and abs(se - (1.6666667 ** 0.5) / 2) < 1e-6


def test_paired_summary_pairs_sample_by_sample():
    before, after = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.5, 5.0, 4.5])
    s, rows = rundir.paired_summary(dict(r=before), dict(r=after))
    assert s["r_before"] == list(rundir.mean_se(before)) and s["r_after"] == list(rundir.mean_se(after))
    d = after - before  # the paired SE is the SE of the differences, not of either side
    assert s["r_gain"] == pytest.approx([d.mean().item(), (d.std() / 2).item()])
    assert [r["samples"] for r in rows] == ["before (n=4)", "after (n=4)", "gain (paired) (n=4)"]


def test_export_video(tmp_path):
    p = rundir.export_video(toy.make_toy_clips(1)[0], tmp_path / "a.mp4")
    import imageio.v3 as iio
    frames = iio.imread(p)
    assert frames.shape[0] == 9 and frames.shape[-1] == 3


# ---------------------------------------------------------------- repeated rows, recorded size
def _pairs(n=4):
    z = torch.randn(n + 1, 16, 1, 2, 2)
    return dict(prompt_embeds=torch.randn(2, 5, 8), prompt_mask=torch.ones(2, 5, dtype=torch.bool),
                prompt_idx=torch.zeros(n, dtype=torch.long), latents_a=z[:n].clone(), latents_b=z[1:].clone(),
                pref=torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("case, message", [
    ("duplicate", "row 3: duplicate of row 0"), ("contradiction", r"row 0: contradicts row\(s\) \[3\]"),
    ("swapped contradiction", r"contradicts row\(s\) \[3\]"), ("self pair", "row 1: latents_a and latents_b are the same")])
def test_repeated_and_contradicting_rows_are_named_or_dropped(case, message):
    d = _pairs()
    if case != "self pair":
        d["latents_a"][3], d["latents_b"][3] = d["latents_a"][0], d["latents_b"][0]
    if case == "contradiction":
        d["pref"][3] = 1
    if case == "swapped contradiction":  # (B, A, B wins) says what (A, B, A wins) says: (A, B, B wins) contradicts it
        d["latents_a"][3], d["latents_b"][3], d["pref"][3] = d["latents_b"][0], d["latents_a"][0], 0
    if case == "self pair":
        d["latents_b"][1] = d["latents_a"][1]
    with pytest.raises(C.UserError, match=message):
        dataset.drop_repeats(d, "pairs", "fail", "data/x")
    kept = dataset.drop_repeats(d, "pairs", "drop", "data/x")
    expected = {"duplicate": 3, "contradiction": 2, "swapped contradiction": 2, "self pair": 3}[case]
    assert len(kept["pref"]) == len(kept["latents_a"]) == expected and len(kept["prompt_embeds"]) == 2


def test_clean_rows_pass_unchanged_and_labels_count():
    d = _toy_tensors()
    assert dataset.drop_repeats(d, "binary", "fail", "x") is d
    d["latents"][1], d["prompt_idx"][1] = d["latents"][0], d["prompt_idx"][0]
    d["label"][1] = 0  # same latent and prompt, another label
    with pytest.raises(C.UserError, match="contradicts"):
        dataset.drop_repeats(d, "binary", "fail", "x")


def test_a_typed_size_that_differs_from_the_data_names_the_flag():
    meta = dict(height=48, width=64, num_frames=13)
    assert dataset.video_size(meta, "d") == meta and dataset.video_size(meta, "d", height=48) == meta
    with pytest.raises(C.UserError, match=r"--num-frames 9: d was prepared at 48x64x13") as e:
        dataset.video_size(meta, "d", num_frames=9)
    assert e.value.code == 2


def test_sample_latents_batch_size_does_not_change_the_samples(pipe):
    """The default batch (~4k tokens: all 6 here) and batches of 4 give each seed the same sample, in seed order (to
    float rounding: a matrix product sums in another order at another batch size, measured up to 3e-6)."""
    embeds, _ = C.encode_prompts(pipe, toy.toy_prompts("eval")[:3])
    embeds, seeds = embeds[[0, 1, 2, 0, 1, 2]], [5, 6, 7, 8, 9, 10]
    whole = C.sample_latents(pipe, embeds, seeds, num_steps=3)
    assert torch.allclose(whole, C.sample_latents(pipe, embeds, seeds, num_steps=3, batch_size=4), atol=1e-5)
    assert not torch.allclose(whole[0], whole[3])  # the same prompt, another seed: another sample


def test_cpu_decode_with_channels_last_weights_gives_the_plain_decode(pipe):
    """decode_latents makes the decoder's Conv3d weights channels-last on the CPU: the same video as a plain decode by
    an untouched copy of the VAE, the same weight values, and the VAE still saves and reloads."""
    import copy
    z = torch.randn(2, *C.backbone_geometry(pipe)["latent_shape"], generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(pipe.vae)
    mean, std = C._latent_stats(ref)
    with torch.no_grad():
        plain = ref.decode(z * std + mean, return_dict=False)[0].clamp(-1, 1)
        fast = C.decode_latents(pipe, z)
    assert torch.allclose(fast, plain, atol=1e-5)
    convs = [n for n, m in pipe.vae.decoder.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(pipe.vae.decoder.get_submodule(n).weight.is_contiguous(memory_format=torch.channels_last_3d)
                         for n in convs)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), ref.state_dict().values()))
