"""REFINE end to end on tiny models: snapshot rollouts equal the official per-prefix re-forwards (tokens, log-probs,
hidden states, rewards, and the gradient of the whole loss), and repeated REFINE steps raise the reward."""
from types import SimpleNamespace

import pytest
import torch

from grpo import refine_loss, rollout_advantages
from model import FastWeightLM, ModelConfig
from reward import compute_reward
from rollout import collect_rollouts, draw, encode_rollouts, reforward_logprobs, sample_token
from test_model import TINY

CFG = dict(n_chunks=2, rollout_len=3, n_rollouts=2, select_mode="entropy", select_temperature=1.0, margin=2,
           sample_temperature=1.0, top_p=1.0, top_k=0, eos_id=None, reward="hybrid", lambda_rl=0.5, lambda_sft=1.0,
           clip_low=0.2, clip_high=0.2, clip_c=3.0, loss_agg="token-mean", kl_coef=0.0, group_by="sequence",
           adv_scale="group")


def tiny(arch, dtype=torch.float64):
    torch.manual_seed(0)
    return FastWeightLM(ModelConfig(**TINY[arch])).to(dtype)


def rewards_and_advantages(ro, cfg):
    n = ro.n
    r = compute_reward(cfg.reward, ro.h_pred, ro.h_gt.repeat_interleave(n, 0), ro.tokens,
                       ro.gt_tokens.repeat_interleave(n, 0))
    return r, rollout_advantages(r, cfg.n_chunks, n, cfg.group_by, cfg.adv_scale)


@pytest.mark.parametrize("eos_id", [None, 7])
@pytest.mark.parametrize("arch", ["deltanet", "gated_deltanet", "lact"])
def test_snapshot_and_reforward_modes_agree(arch, eos_id):
    """fp64, tolerance 1e-9: the two modes differ only in how the prefix state is obtained. With EOS suppressed
    in sampling, the sampled log-probs are still the policy's (the teacher-forced ones: PPO ratio 1 on-policy)."""
    model, cfg = tiny(arch), SimpleNamespace(**dict(CFG, eos_id=eos_id))
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    out_s, ro_s = collect_rollouts(model, x, cfg, torch.Generator().manual_seed(5), mode="snapshot")
    out_r, ro_r = collect_rollouts(model, x, cfg, torch.Generator().manual_seed(5), mode="reforward")
    assert torch.equal(ro_s.positions, ro_r.positions) and torch.equal(ro_s.tokens, ro_r.tokens)
    # float64 model: snapshot and per-prefix paths differ only in summation order (~1e-14 on O(1) values)
    tol = dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ro_s.logp, ro_r.logp, **tol)
    torch.testing.assert_close(ro_s.h_pred, ro_r.h_pred, **tol)
    torch.testing.assert_close(ro_s.h_gt, ro_r.h_gt, **tol)
    r_s, adv = rewards_and_advantages(ro_s, cfg)
    r_r, _ = rewards_and_advantages(ro_r, cfg)
    torch.testing.assert_close(r_s, r_r, **tol)
    # teacher-forced log-probs from the differentiable snapshots equal those of a full re-forward
    logp, _ = reforward_logprobs(model, x, ro_s.positions, ro_s.tokens, ro_s.n)
    torch.testing.assert_close(logp, ro_s.logp, **tol)

    params = list(model.parameters())
    loss_s, _ = refine_loss(model, x, y, out_s, ro_s, adv, cfg, mode="snapshot")
    g_s = torch.autograd.grad(loss_s, params)
    loss_r, _ = refine_loss(model, x, y, out_r, ro_s, adv, cfg, mode="reforward")
    g_r = torch.autograd.grad(loss_r, params)
    torch.testing.assert_close(loss_s, loss_r, **tol)
    for (name, _), a, b in zip(model.named_parameters(), g_s, g_r):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_refine_steps_raise_reward_and_train_every_parameter(arch):
    """Pure NSP (lambda_SFT = 0), cosine reward, one fixed batch: the NSP gradient alone raises the reward, from the
    untrained policy's (the first step's rewards) to the mean of the last 10 of 30 steps, averaged over 3 rollout
    seeds; every parameter moves."""
    cfg = SimpleNamespace(**{**CFG, "reward": "cosine", "lambda_sft": 0.0, "lambda_rl": 1.0, "n_rollouts": 4,
                             "group_by": "position"})
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    rises, unchanged = [], []
    for seed in range(3):
        model = tiny(arch, torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        means = []
        for _ in range(30):
            out, ro = collect_rollouts(model, x, cfg, gen)
            r, adv = rewards_and_advantages(ro, cfg)
            loss, _ = refine_loss(model, x, y, out, ro, adv, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            means.append(r.mean().item())
        rises.append(sum(means[-10:]) / 10 - means[0])
        unchanged += [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    # Without the NSP gradient (advantages zeroed: the policy never moves) a step's mean of 16 rewards scatters with
    # std ~0.05, so this average rise has std ~0.05 * sqrt(1 + 1/10) / sqrt(3) ~ 0.03 (measured: -0.001 DeltaNet,
    # +0.028 LaCT); 0.15 is 5 of those and a third of the smallest average rise measured under ATEN_CPU_CAPABILITY
    # default, avx2 and avx512 (+0.455, DeltaNet under default; LaCT +0.91; one seed alone rose by only +0.28)
    assert sum(rises) / 3 > 0.15, rises
    assert not unchanged, f"parameters that did not change: {unchanged}"


def test_sample_token_knobs():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, logp = sample_token(logits, top_k=2, generator=gen)
    assert set(tok.tolist()) == {2, 3}                                      # top-k keeps the 2 best
    # the same float32 log-softmax of the same logits: assert_close's fp32 defaults
    torch.testing.assert_close(logp[tok == 3][0], torch.log_softmax(logits[0], -1)[3])  # untruncated policy
    tok, logp = sample_token(logits, suppress=3, generator=gen)
    assert 3 not in tok.tolist()                                            # EOS never drawn
    torch.testing.assert_close(logp[0], torch.log_softmax(logits[0], -1)[tok[0]])   # the policy's, not renormalised
    tok, _ = sample_token(logits, top_p=0.5, generator=gen)                 # p(3) = 0.64 >= 0.5: only token 3
    assert set(tok.tolist()) == {3}
    tok, _ = sample_token(logits, temperature=1e-3, generator=gen)          # ~greedy
    assert set(tok.tolist()) == {3}


def test_draw_follows_the_probabilities():
    """rollout.draw (inverse CDF, one uniform per row) against the probabilities it draws from: 40,000 draws of
    unnormalised weights (2 : 0 : 12 : 6); each frequency within 5 binomial standard deviations (<= 0.011 here) of
    its probability, and the zero-weight index never drawn, also where it sits last."""
    gen = torch.Generator().manual_seed(0)
    for weights in ([2.0, 0.0, 12.0, 6.0], [2.0, 12.0, 6.0, 0.0]):
        w = torch.tensor(weights)
        tokens = draw(w.repeat(40_000, 1), gen)
        freq, p = torch.bincount(tokens, minlength=4) / 40_000, w / w.sum()
        assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / 40_000).sqrt() + 1e-12), (freq, p)
        assert freq[w == 0].sum() == 0


def test_kl_coef_reaches_the_refine_loss():
    """--kl_coef adds kl_coef x the k3 KL to the sampling policy: nothing on-policy (the KL and its gradient are 0
    at ratio 1), the token-mean of exp(x) - x - 1 (x = old - new log-prob) once the policy has moved."""
    import dataclasses
    model = tiny("deltanet")
    cfg = SimpleNamespace(**CFG)
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    out, ro = collect_rollouts(model, x, cfg, torch.Generator().manual_seed(5), mode="snapshot")
    _, adv = rewards_and_advantages(ro, cfg)
    moved = dataclasses.replace(ro, logp=ro.logp - 0.3)   # as if the policy raised every log-prob by 0.3
    with_kl = SimpleNamespace(**dict(CFG, kl_coef=0.5))
    on, _ = refine_loss(model, x, x, out, ro, adv, cfg)
    on_kl, _ = refine_loss(model, x, x, out, ro, adv, with_kl)
    off, _ = refine_loss(model, x, x, out, moved, adv, cfg)
    off_kl, stats = refine_loss(model, x, x, out, moved, adv, with_kl)
    # the same computation twice up to the k3 term, which is exactly 0 on-policy
    torch.testing.assert_close(on_kl, on, atol=0, rtol=0)
    # policy_loss works in fp32: a few roundings of O(1) values, ~1e-7 each
    expected = cfg.lambda_rl * 0.5 * (torch.exp(torch.tensor(-0.3)) + 0.3 - 1)
    torch.testing.assert_close(off_kl - off, expected, atol=1e-6, rtol=0)
    assert stats["ref_kl"] > 0


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_frozen_reward_encoder(arch):
    """--reward_encoder=frozen: an encoder with the policy's weights sees exactly the policy's hidden states (fp64,
    1e-9: decoding token by token vs teacher-forcing the k tokens at once, summation order only); once the policy
    moves, train_step's rewards are the frozen copy's, which no update touches."""
    import copy
    import config
    from step import make_optimizer, train_step
    model, cfg = tiny(arch), SimpleNamespace(**CFG)
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    _, ro = collect_rollouts(model, x, cfg, torch.Generator().manual_seed(5))
    h_pred, h_gt = encode_rollouts(copy.deepcopy(model), x, ro)
    torch.testing.assert_close(h_pred, ro.h_pred, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(h_gt, ro.h_gt, atol=1e-9, rtol=1e-9)

    tcfg = config.TrainConfig(**{**CFG, "eos_id": -1, "reward": "cosine", "lr": 1e-2, "seq_len": 24})
    frozen = copy.deepcopy(model).requires_grad_(False)
    weights = copy.deepcopy(frozen.state_dict())
    opt, batch = make_optimizer(model, tcfg), torch.cat([x, x[:, :1]], 1)      # [2, 25]: inputs and targets
    for step in range(3):
        _, ro = collect_rollouts(model, x, tcfg, torch.Generator().manual_seed(step))   # what this step samples
        stats = train_step(model, opt, batch, tcfg, step, 0, 1, True, generator=torch.Generator().manual_seed(step),
                           encoder=frozen)
    h_pred, h_gt = encode_rollouts(frozen, x, ro)
    own = compute_reward("cosine", ro.h_pred, ro.h_gt.repeat_interleave(ro.n, 0))
    expected = compute_reward("cosine", h_pred, h_gt.repeat_interleave(ro.n, 0))
    torch.testing.assert_close(stats["rewards"][0], expected.float(), atol=1e-6, rtol=0)  # fp32 cosine of fp64 states
    assert (own - expected).abs().max() > 1e-3                                   # the policy's own view has moved
    assert all(torch.equal(weights[k], v) for k, v in frozen.state_dict().items())
