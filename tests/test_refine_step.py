"""The REFINE step (method.md §1.8-1.9): fast path == reference path; gradient through the prefix; schedules."""
import math

import pytest
import torch
import torch.nn.functional as F

from refine_mini import refine
from refine_mini.grpo import group_advantages, group_ids
from refine_mini.model import FastWeightLM, ModelConfig
from refine_mini.refine import RefineConfig, refine_loss, refine_step
from refine_mini.rewards import compute_rewards
from refine_mini.rollout import rollouts_forked
from refine_mini.selection import Selection, pad_documents, select_positions, teacher_forced_pass

TINY = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=64, chunk_size=8, lact_chunk=8, window=8, n_heads_fast=2)
MIXERS = ["deltanet", "lact"]
KEYS = ["ntp_loss", "policy_loss", "reward_cosine_mean", "reward_cosine_std", "reward_binary_mean",
        "reward_binary_std", "reward_hybrid_mean", "reward_hybrid_std", "frac_zero_std_groups",
        "selected_entropy_mean", "clip_frac", "ratio_mean", "grad_norm", "tokens_per_s"]


def make_model(mixer, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return FastWeightLM(ModelConfig(mixer=mixer, **TINY)).to(dtype)


def fixed_rollouts(model, docs, cfg, seed=0):
    """Selection, rollouts and advantages computed ONCE, so both loss paths see the same samples."""
    g = torch.Generator().manual_seed(seed)
    padded, lengths = pad_documents(docs)
    entropy, h_gt = teacher_forced_pass(model, padded)
    selection = select_positions(entropy, lengths, cfg.c, cfg.k, cfg.selection, generator=g)
    rollouts = rollouts_forked(model, docs, selection.positions, cfg.k, cfg.n, g)
    rewards = compute_rewards(rollouts, padded, h_gt)
    advantages, _ = group_advantages(rewards[cfg.reward], group_ids(rollouts))
    return selection, rollouts, advantages


def loss_and_grads(model, docs, selection, rollouts, advantages, cfg, path):
    model.zero_grad(set_to_none=True)
    loss, _ = refine_loss(model, docs, selection, rollouts, advantages, cfg, path)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n,detach", [(1, False), (2, False), (1, True)], ids=["n1", "n2", "detached-prefix"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_fast_path_equals_reference_path_in_loss_and_every_gradient(mixer, n, detach):
    """Segmented document forward + forked snapshots (fast) == NTP on whole documents + every [prefix; rollout]
    re-encoded from scratch (reference, as the official code), in float64, for fixed rollouts.

    Tolerance: FastWeightLM.forward casts logits with .float(), so a float64 model still scores tokens in fp32 and the
    two paths differ by fp32 rounding of logits (~1e-8 relative). With fp64 logits they agree to ~1e-15."""
    model = make_model(mixer, dtype=torch.float64)
    docs = [torch.randint(0, 64, (44,)), torch.randint(0, 64, (37,))]
    cfg = RefineConfig(c=4, k=3, n=n, detach_prefix=detach)
    selection, rollouts, advantages = fixed_rollouts(model, docs, cfg)
    assert advantages.abs().max() > 0
    loss_fast, grads_fast = loss_and_grads(model, docs, selection, rollouts, advantages, cfg, "fast")
    loss_ref, grads_ref = loss_and_grads(model, docs, selection, rollouts, advantages, cfg, "reference")
    fp64_logits = model(docs[0][None, :2])[0].dtype == torch.float64
    tol = 1e-12 if fp64_logits else 1e-7
    assert abs(float(loss_fast - loss_ref)) <= tol * abs(float(loss_ref))
    assert grads_fast.keys() == grads_ref.keys() == {name for name, _ in model.named_parameters()}
    flat_fast = torch.cat([grads_fast[name].flatten() for name in grads_ref])
    flat_ref = torch.cat([g.flatten() for g in grads_ref.values()])
    assert float((flat_fast - flat_ref).norm() / flat_ref.norm()) < tol
    for name, g in grads_ref.items():  # every parameter, relative to its own norm (floor for tiny gradients)
        assert float((grads_fast[name] - g).norm()) <= 10 * tol * max(float(g.norm()), 1e-3 * float(flat_ref.norm()))


@pytest.mark.parametrize("mixer", MIXERS)
def test_policy_gradient_reaches_tokens_that_only_built_the_prefix_state(mixer):
    """With λ_NTP = 0, embedding rows of tokens that occur ONLY in the first segment (before the first selected
    position, and in no rollout) receive a policy gradient -- it can only get there through the forked state.
    With detached snapshots (the pre-release no_grad shortcut) the same rows get exactly zero: the test can fail.
    Untied embeddings: a tied LM head would hand every embedding row a gradient through the softmax."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY, tie_embeddings=False))
    g = torch.Generator().manual_seed(0)
    first = torch.randint(48, 64, (21,), generator=g)  # reserved ids 48..63 only in x_0..x_20
    doc = torch.cat([first, torch.randint(0, 48, (27,), generator=g)])  # (48,)
    selection = Selection(torch.tensor([[20, 30, 40]]), torch.zeros(1, 3))
    rollouts = rollouts_forked(model, [doc], selection.positions, 4, 1, g)
    advantages = torch.tensor([1.0, -0.5, -0.5])
    only_prefix = sorted(set(first.tolist()) - set(rollouts.tokens.flatten().tolist()))
    assert only_prefix
    norms = {}
    for detach in (False, True):
        cfg = RefineConfig(c=3, k=4, lambda_ntp=0.0, lambda_rl=1.0, detach_prefix=detach)
        model.zero_grad(set_to_none=True)
        loss, _ = refine_loss(model, [doc], selection, rollouts, advantages, cfg, "fast")
        loss.backward()
        grad = model.embed.weight.grad
        norms[detach] = torch.zeros(len(only_prefix)) if grad is None else grad[only_prefix].norm(dim=1)
    assert norms[False].min() > 0
    assert norms[True].max() == 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_single_schedule_step_is_on_policy_and_logs_every_key(mixer):
    model = make_model(mixer)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    docs = [torch.randint(0, 64, (40,)), torch.randint(0, 64, (29,)), torch.randint(0, 64, (52,))]
    metrics = refine_step(model, optimizer, docs, RefineConfig(c=4, k=3), torch.Generator().manual_seed(0))
    assert all(key in metrics and math.isfinite(metrics[key]) for key in KEYS)
    assert abs(metrics["ratio_mean"] - 1) < 1e-6 and metrics["clip_frac"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("mixer", MIXERS)
def test_one_recorded_forward_equals_separate_selection_pass(mixer, monkeypatch):
    """The single-schedule step (teacher-forced pass = training forward, snapshots rebuilt from its record) takes the
    same positions, rollouts, losses and update as the generic path (no-grad pass, then a segmented forward)."""
    results = []
    for recorded in (True, False):
        model = make_model(mixer, dtype=torch.float64)
        if not recorded:
            monkeypatch.setattr(model, "can_snapshot", lambda: False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 33)]  # padded
        metrics = refine_step(model, optimizer, docs, RefineConfig(c=4, k=3), torch.Generator().manual_seed(0))
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m_a, p_a), (m_b, p_b) = results
    for key in ("loss", "ntp_loss", "policy_loss", "reward_cosine_mean", "reward_binary_mean",
                "selected_entropy_mean", "grad_norm"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_minibatch_schedule_takes_one_step_per_minibatch_and_goes_off_policy():
    """Official schedule: rollouts for the whole batch, then M steps; step 1 is on-policy, later ones are not."""
    model = make_model("deltanet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    tokens = torch.randint(0, 64, (4, 40))
    cfg = RefineConfig(c=4, k=3, schedule="minibatch", minibatches=2, lambda_rl=1.0)
    metrics = refine_step(model, optimizer, tokens, cfg, torch.Generator().manual_seed(0))
    assert isinstance(metrics, list) and len(metrics) == 2
    assert metrics[0]["ratio_max_dev"] < 1e-6
    assert metrics[1]["ratio_max_dev"] > 1e-4
    assert all(key in m for m in metrics for key in KEYS)


def test_same_seed_gives_the_same_step():
    results = []
    for _ in range(2):
        model = make_model("deltanet")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        metrics = refine_step(model, optimizer, torch.randint(0, 64, (2, 36), generator=torch.Generator()
                                                               .manual_seed(1)),
                              RefineConfig(c=4, k=3), torch.Generator().manual_seed(5))
        results.append((metrics["loss"], metrics["reward_cosine_mean"], [p.detach() for p in model.parameters()]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_refine_overfits_a_toy_batch():
    """Repeated steps on one batch drive the NTP loss down (the end-to-end sanity check)."""
    model = make_model("deltanet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    losses = [refine_step(model, optimizer, tokens, RefineConfig(c=2, k=3), g)["ntp_loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0]


def test_bad_config_and_inputs_raise_value_error():
    with pytest.raises(ValueError):
        RefineConfig(reward="bleu")
    with pytest.raises(ValueError):
        RefineConfig(schedule="async")
    model = make_model("deltanet")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError):
        refine_step(model, optimizer, torch.randint(0, 64, (2, 6)), RefineConfig(c=8, k=5), torch.Generator())


def test_ntp_term_is_the_token_mean_over_next_token_targets():
    """The NTP term is the token mean of -log p(x_{t+1} | x_≤t) over all documents: a document of L tokens has
    L - 1 targets (padding and rollout tokens are not targets)."""
    model = make_model("deltanet")
    docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 23)]
    selection = Selection(torch.tensor([[5, 15], [4, 12]]), torch.zeros(2, 2))
    rollouts = rollouts_forked(model, docs, selection.positions, 2, 1, torch.Generator().manual_seed(0))
    _, stats = refine_loss(model, docs, selection, rollouts, torch.zeros(4), RefineConfig(c=2, k=2), "fast")
    with torch.no_grad():
        total = sum(F.cross_entropy(model(d[None])[0][0, :-1].double(), d[1:], reduction="sum") for d in docs)
    assert stats["ntp_loss"] == pytest.approx(float(total) / sum(len(d) - 1 for d in docs), rel=1e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_the_default_config_backpropagates_the_policy_gradient_through_the_prefix(mixer):
    """method.md §1.8, §8.2: by default the next-sequence loss back-propagates through the WHOLE prefix (detaching
    it is only an ablation), so embedding rows that occur only in the prefix get a policy gradient."""
    torch.manual_seed(0)
    model = FastWeightLM(ModelConfig(mixer=mixer, **TINY, tie_embeddings=False))
    g = torch.Generator().manual_seed(0)
    first = torch.randint(48, 64, (21,), generator=g)  # ids 48..63 occur only in x_0..x_20
    doc = torch.cat([first, torch.randint(0, 48, (27,), generator=g)])
    selection = Selection(torch.tensor([[20, 30, 40]]), torch.zeros(1, 3))
    rollouts = rollouts_forked(model, [doc], selection.positions, 4, 1, g)
    only_prefix = sorted(set(first.tolist()) - set(rollouts.tokens.flatten().tolist()))
    assert only_prefix
    cfg = RefineConfig(c=3, k=4, lambda_ntp=0.0, lambda_rl=1.0)  # detach_prefix left at its default
    loss, _ = refine_loss(model, [doc], selection, rollouts, torch.tensor([1.0, -0.5, -0.5]), cfg, "fast")
    loss.backward()
    grad = model.embed.weight.grad
    assert grad is not None and grad[only_prefix].norm(dim=1).min() > 0


@pytest.mark.parametrize("reward", ["binary", "cosine"])
def test_the_configured_reward_drives_the_advantage(reward, monkeypatch):
    """method.md §1.6, §3: the regime's reward (cosine for mid, hybrid for post, binary for TTT) is the one
    standardised into the GRPO advantage; the others are only logged."""
    seen = {}
    real_rewards, real_advantages = refine.compute_rewards, refine.group_advantages

    def spy_rewards(*args, **kwargs):
        seen["rewards"] = real_rewards(*args, **kwargs)
        return seen["rewards"]

    def spy_advantages(rewards, *args, **kwargs):
        seen["input"] = rewards
        return real_advantages(rewards, *args, **kwargs)

    monkeypatch.setattr(refine, "compute_rewards", spy_rewards)
    monkeypatch.setattr(refine, "group_advantages", spy_advantages)
    model = make_model("deltanet")
    tokens = torch.randint(0, 64, (2, 36), generator=torch.Generator().manual_seed(1))
    refine_step(model, torch.optim.SGD(model.parameters(), lr=0.0), tokens, RefineConfig(c=4, k=3, reward=reward),
                torch.Generator().manual_seed(0))
    assert not torch.equal(seen["rewards"]["binary"], seen["rewards"]["cosine"])  # the rewards are distinguishable
    assert torch.equal(seen["input"], seen["rewards"][reward])


@pytest.mark.parametrize("bad", [dict(clip_eps=-0.1), dict(clip_eps=2.0), dict(dual_clip=0.5), dict(adv_eps=-1.0),
                                 dict(tau=0.0), dict(tau=float("nan")), dict(smooth_kernel=4), dict(smooth_kernel=0),
                                 dict(c=2.5), dict(k=True)])
def test_refine_config_refuses_values_that_would_change_the_loss_silently(bad):
    """A negative or > 1 clip, a dual clip <= 1, a non-positive adv_eps or tau, an even or zero smoothing kernel
    and non-integer counts are ValueErrors when the config is made, not a silently different loss (or an error
    deep inside the step)."""
    with pytest.raises(ValueError):
        RefineConfig(**bad)
    RefineConfig(clip_eps=0.1, dual_clip=2.0, adv_eps=1e-8, tau=0.5, smooth_kernel=3)  # the edges that are fine

