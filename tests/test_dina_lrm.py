"""Tests of dina_lrm.py: equations, head properties, adapter isolation, toy-world behaviour, CLI, bad input."""
import dataclasses
import hashlib
import json
import math
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import dataset  # noqa: E402
import dina_lrm as D  # noqa: E402
import estimate  # noqa: E402
import rundir  # noqa: E402
import toy  # noqa: E402


def synthetic_pairs(pipe, folder, n=1024, seed=0, margin=0.15):
    """Toy-prompt pairs whose preference is a known latent feature (the mean of channel 0).

    The toy world's own pairs need ~2000 pairs and ~300 steps before the reward model is clearly
    above chance (see the README), too slow for this suite; this feature is learnable in ~100 steps
    and is destroyed by noise, so it also tests the sigma dependence. Margin: ties as in the toy world.
    """
    g = torch.Generator().manual_seed(seed)
    prompts = toy.toy_prompts("train")
    emb, mask = common.encode_prompts(pipe, prompts)
    a, b = torch.randn(n, 16, 3, 4, 4, generator=g), torch.randn(n, 16, 3, 4, 4, generator=g)
    ra, rb = a[:, 0].mean((1, 2, 3)), b[:, 0].mean((1, 2, 3))
    pref = torch.where(ra - rb > margin, 0, torch.where(rb - ra > margin, 1, 2))
    dataset.save(folder, dict(latents_a=a, latents_b=b, pref=pref, reward_a=ra, reward_b=rb,
                                     prompt_idx=torch.randint(0, len(prompts), (n,), generator=g),
                                     prompt_embeds=emb, prompt_mask=mask),
                        dict(kind="pairs", prompts=prompts, source="toy-synthetic"))
    return str(folder)


def tiny_args(**kw):
    """Args as `python dina_lrm.py` builds them on tiny (TINY's values), then the overrides."""
    return dataclasses.replace(rundir.parse_args(D.Args, D.TINY, []), **kw)


def small_args(out, data, **kw):
    """A quick run; no policy EMA (a few ReFL steps would leave the 8-step EMA at its start: the base model)."""
    base = dict(out_dir=str(out), data=str(data), rm_steps=100, rm_lr=3e-3, test_fraction=0.25, ablation=False,
                eval_sigmas=[0.1, 0.4, 0.9], tune_steps=3, batch_size=4, num_steps=6, eval_samples=24, save_videos=0,
                ema=False)
    base.update(kw)
    return tiny_args(**base)


class capture_pipe:
    """Record the pipeline main() builds (to inspect its weights and adapters afterwards)."""

    def __enter__(self):
        self.load, self.pipe = common.load_backbone, None

        def load(*a, **kw):
            self.pipe = self.load(*a, **kw)
            return self.pipe

        common.load_backbone = load
        return self

    def __exit__(self, *exc):
        common.load_backbone = self.load


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_pairs(common.load_backbone("tiny"), tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One run of both stages; the pipeline it used is captured for the isolation checks."""
    out = tmp_path_factory.mktemp("run")
    with capture_pipe() as cap:
        summary = D.main(small_args(out, data))
    return summary, out, cap.pipe


# ---------------------------------------------------------------- equations
def test_thurstone_variance_matches_eq1_and_grows_with_sigma():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    v = D.thurstone_variance(s, k=2.0, clean_var=0.05)
    torch.testing.assert_close(v, torch.tensor([0.05, 0.175, 0.55, 2.05]))
    assert (v.diff() > 0).all()


def test_thurstone_probability_hand_values():
    r_a, r_b = torch.tensor([1.0, 0.3, -0.2]), torch.tensor([0.0, 0.3, 0.5])
    var = D.thurstone_variance(torch.tensor([0.5, 0.1, 0.9]))
    p = D.thurstone_probability(r_a, r_b, var)
    expect = [statistics.NormalDist().cdf(d / math.sqrt(2 * v + 1e-6))
              for d, v in zip((r_a - r_b).tolist(), var.tolist())]
    torch.testing.assert_close(p, torch.tensor(expect), atol=1e-6, rtol=0)
    assert abs(p[0].item() - 0.8298) < 1e-3  # Phi(1 / sqrt(1.1)) from a normal table
    # the same score gap is less decisive at a higher noise level (the calibration)
    p_lo, p_hi = D.thurstone_probability(torch.tensor(1.0), torch.tensor(0.0), D.thurstone_variance(torch.tensor([0.1, 0.9])))
    assert p_lo > p_hi > 0.5
    # P(A > B) + P(B > A) = 1
    torch.testing.assert_close(p + D.thurstone_probability(r_b, r_a, var), torch.ones(3))


def test_fidelity_loss_hand_values_and_tie_target():
    p = torch.tensor([0.81, 0.25, 1.0])
    torch.testing.assert_close(D.thurstone_fidelity_loss(p), torch.tensor([0.1, 0.5, 0.0]), atol=1e-5, rtol=0)
    # FRank with target 1/2: 1 - sqrt(p/2) - sqrt((1-p)/2), zero exactly at p = 1/2, positive elsewhere
    q = torch.tensor([0.5, 0.9], requires_grad=True)
    tie = D.thurstone_fidelity_loss(q, 0.5)
    assert abs(tie[0].item()) < 1e-5 and tie[1].item() > 0.03
    tie[0].backward()
    assert abs(q.grad[0].item()) < 1e-4


def test_preference_loss_modes():
    a = D.Args()
    r_a, r_b, s = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5])
    fid = lambda p: 1 - math.sqrt(p + 1e-6)
    z = lambda v: statistics.NormalDist().cdf(1 / math.sqrt(2 * v + 1e-6))
    assert abs(D.preference_loss(r_a, r_b, s, 1.0, a).item() - fid(z(0.55))) < 1e-5
    a.loss = "thurstone-constant"
    assert abs(D.preference_loss(r_a, r_b, s, 1.0, a).item() - fid(z(0.5))) < 1e-5
    a.loss = "bt"
    assert abs(D.preference_loss(r_a, r_b, s, 1.0, a).item() - math.log1p(math.exp(-1))) < 1e-5


def test_refl_loss_official_constants():
    r = torch.tensor([-2.0, 8.0])
    assert abs(D.refl_loss(r).item() - ((2 - 1.0) + (2 - 2.0)) / 2) < 1e-6


# ---------------------------------------------------------------- head
def fake_feats(B=2, N=12, L=6, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=[torch.randn(B, N, dim, generator=g) for _ in range(3)],
                text=torch.randn(B, L, dim, generator=g), temb=torch.randn(B, dim, generator=g))


def perturbed_head(dim=32, seed=0):
    torch.manual_seed(seed)
    head = D.DiNaHead(dim)
    with torch.no_grad():  # leave the zero-init: gates and FiLM become non-trivial
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def test_film_is_identity_at_init():
    tap = D.FiLMTap(32, 32, 8)
    x, t1, t2 = torch.randn(2, 5, 32), torch.randn(2, 32), 5 * torch.randn(2, 32)
    torch.testing.assert_close(tap.modulate(x, t1), x + tap.layer_embed)
    torch.testing.assert_close(tap(x, t1), tap(x, t2))
    assert D.value_gate(32)(x).eq(0.5).all()


def test_ensemble_concatenates_tokens_not_scores():
    head = perturbed_head()
    mask = torch.ones(2, 6, dtype=torch.bool)
    f = [fake_feats(seed=s) for s in range(3)]
    single = torch.stack([head([fi], mask) for fi in f])
    # duplicated tokens leave softmax attention unchanged: K copies of one level = that level alone
    torch.testing.assert_close(head([f[0]] * 3, mask), single[0], atol=1e-5, rtol=1e-5)
    ens = head(f, mask)
    assert (ens - single.mean(0)).abs().min() > 1e-3  # not the average of the three scores


def test_text_mask_hides_padding():
    head = perturbed_head()
    f = fake_feats()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    g = dict(f, text=f["text"].clone())
    g["text"][:, 4:] += 10.0
    torch.testing.assert_close(head([f], mask), head([g], mask))
    assert (head([f], torch.ones_like(mask)) - head([g], torch.ones_like(mask))).abs().max() > 1e-3


def test_dina_reward_ensemble_on_backbone_and_shared_eps():
    pipe = common.load_backbone("tiny")
    args = tiny_args()
    head, _ = D.add_reward_model(pipe, args)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        x0, eps = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
        emb, mask = torch.randn(2, 32, 32), torch.ones(2, 32, dtype=torch.bool)
        one = D.dina_reward(pipe.transformer, head, x0, emb, mask, [0.4], eps, args.taps)
        three = D.dina_reward(pipe.transformer, head, x0, emb, mask, [0.4] * 3, eps, args.taps)
        torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)
        levels = [D.dina_reward(pipe.transformer, head, x0, emb, mask, [s], eps, args.taps) for s in (0.2, 0.5, 0.7)]
        ens = D.dina_reward(pipe.transformer, head, x0, emb, mask, [0.2, 0.5, 0.7], eps, args.taps)
        assert (ens - torch.stack(levels).mean(0)).abs().min() > 1e-4
        # the score depends on sigma (the head sees the timestep through FiLM and the backbone)
        assert (levels[0] - levels[2]).abs().max() > 1e-4


# ---------------------------------------------------------------- adapters and gradient isolation
def base_weights(transformer):
    """Base parameters by their plain name (peft renames a wrapped layer's weight to base_layer.weight)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in transformer.named_parameters()
            if "lora_" not in n}


def test_refl_step_gradients_reach_only_the_policy():
    pipe = common.load_backbone("tiny")
    args = tiny_args(num_steps=4, batch_size=2)
    head, reward = D.add_reward_model(pipe, args)
    with torch.no_grad():
        for p in reward + list(head.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    head.requires_grad_(False)
    for p in pipe.transformer.parameters():
        p.requires_grad_(False)
    policy = common.add_lora(pipe.transformer, 32, 64, adapter_name="policy")
    with torch.no_grad():  # non-zero B so gradients reach both LoRA factors
        for p in policy:
            p.add_(torch.randn_like(p) * 0.01)
    emb, mask = torch.randn(2, 32, 32), torch.ones(2, 32, dtype=torch.bool)
    loss, r, mid = D.refl_step(pipe, head, emb, mask, args, torch.Generator().manual_seed(0))
    loss.backward()
    assert mid in (3,)  # 4 steps: late window [round(0.75*4), 3]
    with_grad = {n for n, p in pipe.transformer.named_parameters() if p.grad is not None}
    assert with_grad and all(".policy." in n for n in with_grad)
    assert sum(p.grad.abs().sum() > 0 for p in policy) == len(policy)
    assert all(p.grad is None for p in head.parameters()) and all(p.grad is None for p in reward)
    assert pipe.transformer.active_adapters() == ["policy"]


def test_refl_step_with_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):  # as main and run_refl set it up
        torch.manual_seed(0)
        pipe, args = common.load_backbone("tiny"), tiny_args(num_steps=4, gradient_checkpointing=ckpt)
        if ckpt:
            pipe.transformer.enable_gradient_checkpointing()
        head, reward = D.add_reward_model(pipe, args)
        with torch.no_grad():
            for p in reward + list(head.parameters()):
                p.add_(torch.randn_like(p) * 0.05)
        policy = D.add_policy(pipe, head, args)
        with torch.no_grad():  # non-zero B so gradients reach both LoRA factors
            for p in policy:
                p.add_(torch.randn_like(p) * 0.01)
        assert pipe.transformer.is_gradient_checkpointing == ckpt
        emb, mask = torch.randn(2, 32, 32), torch.ones(2, 32, dtype=torch.bool)
        D.refl_step(pipe, head, emb, mask, args, torch.Generator().manual_seed(0))[0].backward()
        grads.append([p.grad.clone() for p in policy])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert max(g.abs().max() for g in grads[0]) > 0


def test_checkpoint_with_adapter_recomputes_each_block_under_its_own_adapter():
    # DiNa's ReFL backward spans a policy-adapter step and the reward-adapter blocks; diffusers' checkpointing
    # recomputes both under the adapter active at backward time: an error here (ranks differ), else wrong grads.
    torch.manual_seed(0)
    tiny = common.WAN_CONFIGS["tiny"]
    tiny2 = dict(tiny, transformer=dict(tiny["transformer"], num_layers=2))
    tr = estimate.build_wan_transformer(tiny2, torch.float32, gradient_checkpointing=False)
    common.add_lora(tr, 8, adapter_name="reward")
    tr.requires_grad_(False)  # as run_refl: the reward adapter is frozen
    policy = common.add_lora(tr, 4, adapter_name="policy")
    for n, p in tr.named_parameters():
        if "lora_B" in n:  # B = 0 at init would hide what the adapters do
            torch.nn.init.normal_(p, std=0.5)
    x, e = torch.randn(1, *estimate.latent_shape(tiny2)), torch.randn(1, 32, 32)

    def policy_grads():
        D.set_active_adapter(tr, "policy")
        v = common.predict_velocity(tr, x, 0.5, e)
        D.set_active_adapter(tr, "reward")
        r = common.predict_velocity(tr, x - v, 0.5, e).square().mean()
        D.set_active_adapter(tr, "policy")
        r.backward()
        grads = [p.grad.clone() for p in policy]
        tr.zero_grad(set_to_none=True)
        return grads

    reference = policy_grads()  # no checkpointing: every activation kept
    tr.enable_gradient_checkpointing()
    with pytest.raises(CheckpointError):
        policy_grads()
    tr.zero_grad(set_to_none=True)
    D.checkpoint_with_adapter(tr, D.set_active_adapter)
    fixed = policy_grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fixed, reference))
    assert max(g.abs().max() for g in reference) > 0


def test_optimiser_step_accumulates_the_mean_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    grads = []
    for accum in (1, 4):
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([w], lr=1.0)
        chunks = iter(zip(x.chunk(accum), y.chunk(accum)))

        def micro_step():
            xb, yb = next(chunks)
            return ((xb @ w - yb) ** 2).mean(), len(xb)

        loss, sizes = D.optimiser_step(opt, [w], micro_step, accum, grad_clip=1e9, where="test")
        grads.append(-w.detach())  # SGD lr 1 from 0: w = -grad
        assert sizes == [8 // accum] * accum and abs(loss - (y ** 2).mean().item()) < 1e-6
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(common.UserError, match="step 7: loss is nan"):
        D.optimiser_step(opt, [w], lambda: (torch.tensor(float("nan")), None), 1, 1.0, "step 7")


def test_set_active_adapter_keeps_requires_grad():
    pipe = common.load_backbone("tiny")
    reward = common.add_lora(pipe.transformer, 4, 8, adapter_name="reward", blocks=[0])
    for p in reward:
        p.requires_grad_(False)
    policy = common.add_lora(pipe.transformer, 4, 8, adapter_name="policy")
    D.set_active_adapter(pipe.transformer, "reward")
    assert not any(p.requires_grad for p in reward) and all(p.requires_grad for p in policy)
    assert pipe.transformer.active_adapters() == ["reward"]


def test_stage1_trains_only_reward_adapter_and_head_stage2_only_policy(trained):
    summary, out, pipe = trained
    fresh = common.load_backbone("tiny")  # deterministic: the same random base
    before, after = base_weights(fresh.transformer), base_weights(pipe.transformer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    # stage 1 wrote the reward model; stage 2 must have left it bit-identical
    sd = load_file(str(out / "reward_model.safetensors"))
    live = {f"lora.{k}": v for k, v in common.lora_state_dict(pipe.transformer, "reward").items()}
    assert live and all(torch.equal(sd[k], v) for k, v in live.items())
    assert any(v.abs().sum() > 0 for k, v in live.items() if "lora_B" in k)  # stage 1 did train it
    assert any(k.startswith("head.") for k in sd)
    # the reward LoRA covers exactly blocks 0..11, the policy the whole generator
    blocks = {int(n.split(".")[1]) for n, _ in pipe.transformer.named_parameters() if ".reward." in n}
    assert blocks == set(range(12))
    policy = common.lora_state_dict(pipe.transformer, "policy")
    assert any(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k)


def test_text_encoder_is_dropped_before_any_training(tmp_path, data, monkeypatch):
    """Every prompt (training table, held-out prompts, CFG negative) is encoded first; T5 (UMT5-XXL at real
    scale) is gone before stage 1 and stage 2 start."""
    seen = []
    train_rm, refl = D.reward_model_stage, D.run_refl
    monkeypatch.setattr(D, "reward_model_stage", lambda pipe, *a: seen.append(("rm", pipe.text_encoder)) or train_rm(pipe, *a))
    monkeypatch.setattr(D, "run_refl", lambda pipe, *a: seen.append(("refl", pipe.text_encoder)) or refl(pipe, *a))
    summary = D.main(small_args(tmp_path / "o", data, rm_steps=2, tune_steps=1, eval_samples=12, guidance_scale=2.0))
    assert seen == [("rm", None), ("refl", None)]
    assert all(math.isfinite(v) for v in summary["true_reward_gain"])  # the held-out prompts (encoded first) scored


def test_stage1_has_no_policy_adapter_and_leaves_the_ablation_inactive(tmp_path, data):
    with capture_pipe() as cap:  # every adapter is built before FSDP2 shards the blocks, so the ablation's stays
        s = D.main(small_args(tmp_path, data, stage="rm", rm_steps=2, ablation=True, eval_sigmas=[0.4]))
    assert list(cap.pipe.transformer.peft_config) == ["reward", "ablation"]
    assert cap.pipe.transformer.active_adapters() == ["reward"]
    assert "ablation_acc_sigma_0.4" in s and "true_reward_gain" not in s
    from safetensors import safe_open  # the checkpoint records the loss that trained it
    with safe_open(str(tmp_path / "reward_model.safetensors"), "pt") as f:
        assert f.metadata()["loss"] == "thurstone"


# ---------------------------------------------------------------- behaviour
def test_reward_model_beats_chance_on_held_out_pairs(trained):
    summary, _, _ = trained
    # chance is 0.5; measured on ~117 strict test pairs (one thread): 0.778 +- 0.039 at sigma 0.1, 0.735 +- 0.041 at
    # 0.4, 0.701 +- 0.043 for the ensemble, 0.462 at 0.9; thresholds about 4 SE below (the ensemble's 3.5); a broken
    # loss, pairing or sign stays near or under 0.5
    assert summary["acc_sigma_0.1"] > 0.62, summary["accuracy_table"]
    assert summary["acc_sigma_0.4"] > 0.57, summary["accuracy_table"]
    assert summary["acc_ensemble"] > 0.55, summary["accuracy_table"]
    # at sigma 0.9 the feature is mostly noise: the score must depend on the noise level as it should (gap 0.316)
    assert summary["acc_sigma_0.1"] - summary["acc_sigma_0.9"] > 0.1, summary["accuracy_table"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, shared_toy_cache):
    """`python dina_lrm.py` as the demo runs it (TINY: the 1024 toy pairs of seed 0, one cache with PRISM's tests),
    without its two videos; main seeds everything from --seed 0 and every draw uses its own generator."""
    out = tmp_path_factory.mktemp("demo") / "run"
    return D.main(tiny_args(out_dir=str(out), toy_cache=str(shared_toy_cache), save_videos=0))


def test_demo_reward_model_ranks_held_out_toy_pairs(demo):
    # the demo's 145 held-out strict pairs, chance 0.5: measured 0.779 +- 0.035 at sigma 0.4 (8.0 SE above chance,
    # with 1 and 2 threads alike: toy_dataset builds with one; 0.759 +- 0.036 on an AVX-512 CPU); the threshold is
    # 4 SE below it, 3.7 SE above chance
    assert demo["acc_sigma_0.4"] > 0.63, demo["accuracy_table"]


def test_demo_refl_raises_the_true_toy_reward(demo):
    # the claim: ReFL with the learned reward raises the true (pixel) toy reward of fresh samples of the held-out
    # prompts, 768 paired by seed. TINY's 20 steps, measured +0.090 +- 0.024 (3.7 SE; 1 and 2 threads alike, AVX-512
    # EPYC, 2026-12-03); 30 steps gave +0.107 +- 0.023 on a CPU without AVX-512 but +0.044 +- 0.028 on this one,
    # whose float order trains a slightly weaker reward model that ReFL games sooner (docs/dina_lrm.md). The threshold
    # (0.015, 3.1 SE below) asserts "a gain", not its size: a policy that games the reward model (--tune-steps 50:
    # +0.004 +- 0.035; --lr 4e-4: -0.242 +- 0.029) or no training (0 exactly) fails it. The DiNa score it optimises:
    # +3.103 +- 0.102, threshold 4 SE below.
    gain, se = demo["true_reward_gain"]
    assert gain > 0.015, demo
    assert demo["dina_reward_gain"][0] > 2.69, demo
    assert demo["claims"] == [dict(claim=demo["claims"][0]["claim"], mean=gain, se=se)]  # what `make demo` prints


# ---------------------------------------------------------------- CLI smoke and saved LoRA
def test_cli_tune_stage_and_lora_loads(trained, tmp_path, data, cli):
    _, out, _ = trained
    argv = ["--stage", "tune", "--reward-ckpt", out / "reward_model.safetensors", "--out-dir", tmp_path / "cli",
            "--data", data, "--tune-steps", "2", "--batch-size", "2", "--num-steps", "4",
            "--eval-samples", "12", "--save-videos", "1", "--no-ema"]  # 2 steps: the 8-step EMA would still be B = 0
    code, stdout, err = cli("dina_lrm", argv, cwd=tmp_path)  # `python dina_lrm.py`, in this process (conftest)
    assert code == 0, err[-3000:]
    assert "true_reward" in stdout
    assert (tmp_path / "cli" / "videos" / "after_0.mp4").stat().st_size > 0
    pipe = common.load_backbone("tiny")
    x, e = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 32, 32)
    v0 = common.predict_velocity(pipe.transformer, x, 0.5, e)
    pipe.load_lora_weights(str(tmp_path / "cli" / "policy_lora"), adapter_name="policy")
    assert pipe.transformer.peft_config["policy"].lora_alpha == 64  # scale alpha / r = 2 survives the round trip
    assert (common.predict_velocity(pipe.transformer, x, 0.5, e) - v0).abs().max() > 0


# ---------------------------------------------------------------- bad input
def write_pairs(folder, n=4, shape=(16, 3, 4, 4), nan=False, pref=None, meta=(), **rows):
    """A small 'pairs' dataset (one prompt); `rows` replace its per-row tensors, `meta` adds to meta.json."""
    g = torch.Generator().manual_seed(0)
    t = dict(latents_a=torch.randn(n, *shape, generator=g), latents_b=torch.randn(n, *shape, generator=g),
             pref=pref if pref is not None else torch.zeros(n, dtype=torch.long),
             prompt_idx=torch.zeros(n, dtype=torch.long), prompt_embeds=torch.randn(1, 32, 32),
             prompt_mask=torch.ones(1, 32, dtype=torch.bool))
    if nan:
        t["latents_a"][1, 0, 0, 0, 0] = float("nan")
    t.update(rows)
    dataset.save(folder, t, dict(kind="pairs", prompts=["a red square moving left"], source="test", **dict(meta)))
    return str(folder)


def test_bad_flags_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    # parse_args refuses what min / max / gt / nonempty say (exit 2); main itself checks the rest, before loading
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded a model"))
    for argv, match in [(["--stage", "tune"], "--stage tune needs --reward-ckpt"), (["--taps", "4", "13"], "--taps"),
                        (["--test-fraction", "1.0"], "--test-fraction"), (["--rm-lr", "0"], "--rm-lr"),
                        (["--ensemble-sigmas"], "--ensemble-sigmas"), (["--max-steps", "0"], "--max-steps"),
                        (["--height", "0"], "--height"), (["--backbone", "wan2.1-1.3b"], "toy world"),
                        (["--rm-blocks", "13", "--taps", "13"], "--rm-blocks 13"), (["--num-frames", "10"], "--num-frames")]:
        with pytest.raises((common.UserError, SystemExit)) as e:
            D.main(rundir.parse_args(D.Args, D.TINY, ["--out-dir", str(tmp_path / "run"), *argv]))
        code = e.value.code
        message = str(e.value) if isinstance(e.value, common.UserError) else capsys.readouterr().err
        assert code == 2 and match in message, (argv, message)
        assert not (tmp_path / "run").exists()


def test_duplicates_are_dropped_on_request(tmp_path):
    a, b = torch.randn(8, 16, 3, 4, 4), torch.randn(8, 16, 3, 4, 4)
    pref = torch.tensor([0, 1, 0, 0, 0, 1, 2, 0])
    a[1], b[1] = b[0], a[0]  # row 0 swapped with the preference swapped: a repeat
    a[2], b[2] = a[0], b[0]  # row 0 again, as is: a repeat
    a[4], b[4] = a[3], b[3]  # row 3 with the other winner: both contradict
    pref[4] = 1
    b[5], b[6] = a[5], a[6]  # A = B: with a winner (contradicts), as a tie (fine)
    folder = write_pairs(tmp_path / "d", 8, latents_a=a, latents_b=b, pref=pref)
    with pytest.raises(common.UserError) as e:
        D.read_pairs(tiny_args(data=folder))
    for line in ["row 1: duplicate of row 0", "row 2: duplicate of row 0", "row 3: contradicts row(s) [4]",
                 "row 4: contradicts row(s) [3]", "row 5: latents_a and latents_b are the same"]:
        assert line in str(e.value)
    data, _ = D.read_pairs(tiny_args(data=folder, on_duplicates="drop"))
    assert data["pref"].tolist() == [0, 2, 0] and torch.equal(data["latents_a"][2], a[7])
    assert len(data["prompt_embeds"]) == 1  # the prompt table is not per row


def tree_hash(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


GOOD = dict(n=8, pref=torch.tensor([0, 1, 0, 1, 2, 0, 1, 0]), meta=dict(height=32, width=32, num_frames=9))


def with_data(tmp, **kw):
    """--data <a good small dataset with one thing broken>"""
    return ["--data", write_pairs(tmp / "data", **{**GOOD, **kw})]


def edit_meta(tmp, **kw):
    folder = Path(with_data(tmp)[1])
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(kw.pop("text", None) or json.dumps({**meta, **kw}))
    return ["--data", str(folder)]


def text_file(tmp):
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    return str(tmp / "notes.txt")


def repeated_row(tmp):
    a, b = torch.randn(8, 16, 3, 4, 4), torch.randn(8, 16, 3, 4, 4)
    a[5], b[5] = a[2], b[2]  # row 5 = row 2 (same prompt, same 'pref')
    return with_data(tmp, latents_a=a, latents_b=b)


# (bad input, extra argv made in a tmp folder, exit code, what the error line must name)
BAD_INPUTS = [
    ("missing data folder", lambda tmp: ["--data", str(tmp / "nope")], 1, ["nope", "no meta.json"]),
    ("data is a file", lambda tmp: ["--data", text_file(tmp)], 1, ["notes.txt", "no meta.json"]),
    ("meta.json not JSON", lambda tmp: edit_meta(tmp, text="{kind: pairs"), 1, ["meta.json", "not valid JSON"]),
    ("wrong kind", lambda tmp: edit_meta(tmp, kind="binary"), 1, ["kind is 'binary'", "'pairs'"]),
    ("NaN in a shard", lambda tmp: with_data(tmp, nan=True), 1, ["'latents_a'", "NaN", "rows [1]"]),
    ("latents of another size", lambda tmp: with_data(tmp, shape=(16, 3, 4, 6)), 1,
     ["'latents_a'", "(16, 3, 4, 6)", "32x32x9"]),
    ("empty dataset", lambda tmp: with_data(tmp, n=0, pref=torch.zeros(0, dtype=torch.long)), 1, ["data", "empty"]),
    ("prompt index out of range", lambda tmp: with_data(tmp, prompt_idx=torch.tensor([0, 0, 0, 3, 0, 0, 0, 0])), 1,
     ["prompt_idx", "[3]"]),
    ("pref not 0/1/2", lambda tmp: with_data(tmp, pref=torch.tensor([0, 1, 3, 1, 2, 0, 1, 0])), 1,
     ["'pref'", "rows [2]"]),
    ("every pair a tie", lambda tmp: with_data(tmp, pref=torch.full((8,), 2)), 1, ["no strict pair", "tie"]),
    ("repeated rows", repeated_row, 1, ["row 5: duplicate of row 2", "--on-duplicates drop"]),
    ("size that conflicts with the data", lambda tmp: with_data(tmp) + ["--height", "64"], 2, ["--height 64", "32"]),
    ("size the VAE cannot make", lambda tmp: ["--num-frames", "10"], 2, ["--num-frames", "4k+1"]),
    ("out-of-range flag", lambda tmp: ["--rm-batch", "0"], 2, ["--rm-batch"]),
    ("negative seed", lambda tmp: ["--seed", "-1"], 2, ["--seed"]),
    ("more blocks than the backbone", lambda tmp: ["--rm-blocks", "13"], 2, ["--rm-blocks 13", "12"]),
    ("missing checkpoint", lambda tmp: ["--stage", "tune", "--reward-ckpt", str(tmp / "nope.safetensors")], 1,
     ["nope.safetensors", "no such file"]),
    ("checkpoint that is no safetensors", lambda tmp: ["--stage", "tune", "--reward-ckpt", text_file(tmp)], 1,
     ["notes.txt", "not a safetensors file"]),
    ("safetensors that is no reward model", lambda tmp: ["--stage", "tune", "--reward-ckpt", str(
        Path(write_pairs(tmp / "other")) / "shard-00000.safetensors")], 1, ["shard-00000", "not a DiNa-LRM reward"]),
    ("unwritable --out-dir", lambda tmp: ["--out-dir", text_file(tmp) + "/run"], 2, ["notes.txt/run", "cannot write"]),
]


@pytest.mark.parametrize("name, make, code, names", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_ends_as_one_error_line(name, make, code, names, tmp_path, cli):
    """Each bad input through the CLI's entry point (in this process: conftest's `cli`): exit 2 (a flag) or 1 (data,
    files), `error:` naming the cause, no traceback, nothing loaded, and the earlier run folder passed as --out-dir
    and the dataset unchanged byte for byte."""
    earlier = tmp_path / "earlier-run"
    write_pairs(earlier / "data")  # any files: args.json, metrics, a safetensors
    (earlier / "args.json").write_text('{"seed": 0}\n')
    (earlier / "metrics.jsonl").write_text('{"step": 0, "loss": 0.5}\n')
    argv = make(tmp_path)
    argv = ["--out-dir", str(earlier)] * ("--out-dir" not in argv) + argv
    before = [tree_hash(earlier), tree_hash(tmp_path / "data") if (tmp_path / "data").exists() else None]
    returncode, _, stderr = cli("dina_lrm", argv, cwd=tmp_path)
    assert returncode == code, (returncode, stderr[-2000:])
    lines = stderr.strip().splitlines()  # progress bars, then the error (a list of rows may follow its line)
    first = next((i for i, line in enumerate(lines) if line.startswith(("error:", "dina_lrm.py: error:"))), None)
    assert first is not None and "Traceback" not in stderr, stderr[-2000:]
    message = "\n".join(lines[first:])
    assert all(n in message for n in names), message
    assert [tree_hash(earlier), tree_hash(tmp_path / "data") if (tmp_path / "data").exists() else None] == before


def test_max_steps_caps_every_stage(tmp_path, data):
    s = D.main(small_args(tmp_path / "o", data, rm_steps=5, tune_steps=3, max_steps=2, eval_samples=2, ablation=True,
                          eval_sigmas=[0.4]))
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    steps = [[r["step"] for r in rows if r["stage"] == stage] for stage in ("rm-reward", "rm-ablation", "refl")]
    assert steps == [[0, 1]] * 3
    assert s["tune_steps"] == 2  # the summary reports the steps run (--max-steps), not --tune-steps


def test_estimate_memory_of_a_folder_backbone_at_a_size(tmp_path, capsys):
    toy.build_tiny_pipeline().save_pretrained(tmp_path / "wan")  # no data and no weights are read
    res = D.main(tiny_args(backbone=str(tmp_path / "wan"), estimate_memory=True, height=48, width=64, num_frames=13))
    assert list(res)[0].startswith("load phase") and len(res) == 3 and "48x64x13" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="--height --width --num-frames"):
        D.main(tiny_args(backbone=str(tmp_path / "wan"), estimate_memory=True, height=40))


def test_reward_ckpt_with_other_head_config_is_rejected(trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(common.UserError, match="--num-queries 4, this run has 2; --num-heads 8, this run has 4"):
        D.main(tiny_args(stage="tune", reward_ckpt=str(out / "reward_model.safetensors"), num_queries=2, num_heads=4,
                         data=write_pairs(tmp_path / "d"), out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the official choices (issue #16)
def test_lora_init_is_peft_gaussian_as_official_or_peft_default():
    for init in ("gaussian", "kaiming"):
        pipe = common.load_backbone("tiny")
        head = D.add_reward_model(pipe, tiny_args(lora_init=init))[0]
        D.add_policy(pipe, head, tiny_args(lora_init=init))
        for adapter, rank in (("reward", 64), ("policy", 32)):
            a, b = ([p for n, p in pipe.transformer.named_parameters() if f".{part}.{adapter}." in n]
                    for part in ("lora_A", "lora_B"))
            std = torch.cat([p.flatten() for p in a]).std().item()
            assert a and all(p.eq(0).all() for p in b)  # B = 0 either way: both adapters start as the identity
            if init == "gaussian":  # peft's init_lora_weights="gaussian": A ~ N(0, 1/r)
                assert abs(std * rank - 1) < 0.05, (adapter, std)
            else:  # peft's default, kaiming-uniform: |A| <= 1/sqrt(fan_in), fan_in = tiny's width 32
                assert max(p.abs().max() for p in a) <= 32 ** -0.5 and std * rank > 3, (adapter, std)


def test_refl_evaluates_and_saves_the_policy_ema_and_decays_weights(trained, tmp_path, data):
    # official ReFL: EMA with decay min((1+n)/(10+n), 0.9) after every 8th step (n = 8: 1/2 start + 1/2 trained, and
    # B = 0 at the start); the stage's checkpoint keeps the trained weights; AdamW weight decay 1e-4
    run = tmp_path / "ema"
    D.main(small_args(run, data, stage="tune", reward_ckpt=str(trained[1] / "reward_model.safetensors"), tune_steps=8,
                      ema=True, eval_samples=2))
    from safetensors import safe_open
    with safe_open(str(run / "checkpoints" / "refl.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
        trained_b = {k.split("/", 2)[2]: f.get_tensor(k) for k in f.keys() if k.startswith("model/") and "lora_B" in k}
    assert state["step"] == 8 and state["optim_groups"][0]["weight_decay"] == 1e-4
    saved = load_file(str(run / "policy_lora" / "pytorch_lora_weights.safetensors"))
    assert trained_b and max(v.abs().max() for v in trained_b.values()) > 0
    for k, v in trained_b.items():  # checkpoint: blocks.0.attn1.to_q.lora_B.policy.weight; saved: transformer.<no name>
        torch.testing.assert_close(saved["transformer." + k.replace(".policy.", ".")], 0.5 * v, rtol=0, atol=0)


# ---------------------------------------------------------------- long runs (issue #14): run folders, checkpoints, resume
def same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_max_steps_then_resume_equals_one_run(trained, tmp_path, data):
    """Each stage stopped by --max-steps, then --resume'd, ends bit-identical to one run: stage 1 (the reward model
    resumes; the ablation after it reruns from its start) and ReFL (its LoRA, AdamW, generator and EMA). Bookkeeping,
    not learning: small batches and 10% held out (six runs of main, each scored)."""
    ckpt = str(trained[1] / "reward_model.safetensors")
    for stage, stop, kw, product, keys in [
            ("rm", 2, dict(rm_steps=4, rm_batch=8, ablation=True, eval_sigmas=[0.4], test_fraction=0.1),
             "reward_model.safetensors",
             ["acc_sigma_0.4", "acc_ensemble", "ablation_acc_sigma_0.4", "ablation_acc_ensemble"]),
            ("tune", 9, dict(reward_ckpt=ckpt, tune_steps=10, ema=True, eval_samples=4, batch_size=1),  # an EMA update
             "policy_lora/pytorch_lora_weights.safetensors", ["dina_reward_gain", "true_reward_gain"])]:  # at step 8
        one = D.main(small_args(tmp_path / f"{stage}-one", data, stage=stage, **kw))
        D.main(small_args(tmp_path / f"{stage}-two", data, stage=stage, max_steps=stop, **kw))
        two = D.main(small_args(tmp_path / f"{stage}-two", data, stage=stage, resume=True, **kw))
        assert same_tensors(tmp_path / f"{stage}-one" / product, tmp_path / f"{stage}-two" / product), stage
        assert all(one[k] == two[k] for k in keys), (stage, one, two)


def test_sigint_mid_stage_saves_and_resume_gives_the_same_result(tmp_path, data, cli):
    argv = ["--data", data, "--stage", "rm", "--rm-steps", "20", "--rm-batch", "8", "--rm-lr", "3e-3", "--ablation",
            "--test-fraction", "0.1", "--eval-sigmas", "0.4", "--ensemble-sigmas", "0.4", "--checkpoint-every", "7"]
    p = subprocess.Popen([sys.executable, str(ROOT / "dina_lrm.py"), *argv, "--out-dir", str(tmp_path / "r")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    seen = b""
    while not re.search(rb"rm-ablation:\s+\d+%\|[^|]*\|\s*[1-9]\d*/20", seen):  # the second stage is under way
        chunk = p.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    p.send_signal(signal.SIGINT)
    err = (seen + p.stderr.read()).decode(errors="replace")
    assert p.wait(timeout=120) == 130 and "Traceback" not in err, err[-2000:]
    assert "SIGINT at step" in err and "stage 'rm-ablation'" in err and "--resume" in err.splitlines()[-1]
    code, _, err = cli("dina_lrm", [*argv, "--out-dir", tmp_path / "r", "--resume"], cwd=tmp_path)  # in this process
    assert code == 0, err[-2000:]
    one = D.main(rundir.parse_args(D.Args, D.TINY, [*argv, "--out-dir", str(tmp_path / "one")]))
    two = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert same_tensors(tmp_path / "one" / "reward_model.safetensors", tmp_path / "r" / "reward_model.safetensors")
    assert two["ablation_acc_sigma_0.4"] == one["ablation_acc_sigma_0.4"] and two["acc_sigma_0.4"] == one["acc_sigma_0.4"]


def test_an_existing_out_dir_is_refused_without_resume_and_has_its_plots(trained, data):
    _, out, _ = trained
    before = tree_hash(out)
    with pytest.raises(common.UserError, match="already holds a run; pass --resume"):
        D.main(small_args(out, data))
    assert tree_hash(out) == before
    assert {p.name for p in out.glob("*.png")} == {"rm-reward.png", "accuracy_vs_sigma.png", "refl.png"}


# ---------------------------------------------------------------- the defaults mechanism on the command line
def test_typed_values_win_on_tiny_even_the_paper_default(tmp_path, data, cli):
    # --rm-lr 5e-5, --grad-accum 4 and --gradient-checkpointing are the paper's values, TINY has others: typed, they
    # must be used. Effect of --grad-accum 4: the logged ReFL step holds 4 micro-batches (4 mid steps).
    # `python dina_lrm.py ...` through its entry point, in this process (conftest's `cli`)
    code, _, err = cli("dina_lrm", ["--data", data, "--out-dir", tmp_path / "run", "--rm-steps", "3", "--rm-lr", "5e-5",
                                    "--no-ablation", "--eval-sigmas", "0.4", "--ensemble-sigmas", "0.4", "--tune-steps",
                                    "1", "--batch-size", "1", "--grad-accum", "4", "--num-steps", "2", "--eval-samples",
                                    "1", "--save-videos", "0", "--gradient-checkpointing"], cwd=tmp_path)
    assert code == 0, err[-3000:]
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["rm_lr"] == 5e-5 != D.TINY["rm_lr"] and args["grad_accum"] == 4 != D.TINY["grad_accum"]
    assert args["gradient_checkpointing"] is True and args["ablation"] is False
    assert args["lr"] == D.TINY["lr"] != D.Args.lr  # not typed: TINY's
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "rm-reward"] == [0, 1, 2]
    refl = [r for r in rows if r["stage"] == "refl"]
    assert len(refl) == 1 and all(len(r["mid_step"]) == 4 for r in refl)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "ablation_acc_sigma_0.4" not in summary


def test_help_shows_the_effective_tiny_values_and_bad_flags_say_error(tmp_path, cli):
    code, out, err = cli("dina_lrm", ["--help"], cwd=tmp_path)
    assert code == 0, err[-3000:]
    text = " ".join(out.split())
    assert "--toy-size" in text and "~70% are strict" in text  # a % in a help string once crashed --help
    for key in ("tune_steps", "grad_accum", "eval_samples", "rm_lr"):  # the two columns, and tiny's as the default
        tiny, paper = D.TINY[key], getattr(D.Args, key)
        assert tiny != paper and f"[paper: {paper}; tiny: {tiny}] (default: {tiny})" in text, key
    real = " ".join(cli("dina_lrm", ["--backbone", "wan2.1-1.3b", "--help"], cwd=tmp_path)[1].split())
    tiny, paper = D.TINY["tune_steps"], D.Args.tune_steps
    assert f"[paper: {paper}; tiny: {tiny}] (default: {paper})" in real
    code, _, err = cli("dina_lrm", ["--stage", "tune"], cwd=tmp_path)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --stage tune needs --reward-ckpt"), err
    assert "Traceback" not in err


# ---------------------------------------------------------------- multi-GPU (issue #18): torchrun on CPU (gloo)
def test_torchrun_two_processes_train_what_one_process_trains(tmp_path, data, cli):
    """Both stages (and the ablation) under `torchrun --nproc_per_node 2` with FSDP2: one run folder, one reward
    model and one policy LoRA, equal to one process's on the same global batches; the held-out numbers too."""
    argv = ["--data", data, "--rm-steps", "2", "--tune-steps", "2", "--max-steps", "2", "--rm-batch",
            "4", "--batch-size", "4", "--eval-samples", "4", "--num-steps", "3", "--eval-sigmas", "0.4",
            "--ensemble-sigmas", "0.2", "0.5", "--ablation", "--test-fraction", "0.05", "--save-videos", "0"]
    code, _, err = cli("dina_lrm", [*argv, "--out-dir", tmp_path / "one"])  # one process (`python dina_lrm.py`): this
    assert code == 0, err[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "dina_lrm.py", *argv,
                        "--out-dir", str(tmp_path / "two")], cwd=ROOT, env=dict(__import__("os").environ,
                       OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("summary: ") == 1  # rank 1 prints nothing
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 6  # 3 stages x 2 steps, rank 0
    for f in ("reward_model.safetensors", "policy_lora/pytorch_lora_weights.safetensors"):
        one, two = load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "two" / f))
        assert one.keys() == two.keys() and any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
        for k in one:  # a bias that shifts every reward alike, or every key of a softmax, has a zero gradient in
            gauge = re.search(r"to_reward\.bias|ffn\.2\.bias|\.k_[vt]\.bias", k)  # exact math: Adam's first steps
            tol = dict(rtol=0, atol=2 * 2 * D.TINY["rm_lr"]) if gauge else dict(rtol=1e-4, atol=1e-5)  # turn its
            torch.testing.assert_close(two[k], one[k], **tol, msg=k)  # rounding into +-lr a step: bounded, not equal
    one, two = (json.loads((tmp_path / o / "summary.json").read_text()) for o in ("one", "two"))
    assert one["pairs"] == two["pairs"] and two["claims"][0]["mean"] == pytest.approx(one["true_reward_gain"][0],
                                                                                      abs=1e-4)
