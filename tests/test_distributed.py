"""Data parallel on torch's engines: 2 CPU processes (gloo, torchrun) under DistributedDataParallel and under FSDP2
compute the step of 1 process, and a 2-process checkpoint resumes in 1 process.

What is compared, and why it carries signal: from the SAME weights (a fresh model, or one checkpoint), the two runs
must sample the same rollouts (their rewards, rollout by rollout), reach the same NTP loss, the same gradient
before clipping and AdamW (every element), and the same weights after the step. None of these is 0 by
construction; the logged NSP loss is not compared: on-policy with one PPO epoch it is 0 up to float noise (ratio 1,
advantages centred per group). The steps after the first are not compared: AdamW divides the gradient by
sqrt(v), so summation-order noise in a near-zero gradient element moves its weight by up to ~lr, and everything
after that step depends on it. Each tolerance below is derived from where the two runs' float operations differ.

The runs go through this file: `python tests/test_distributed.py TRACE train.py-args` runs train.py's main with
two taps (the gradients before clipping, the rewards of each step) and saves them to TRACE."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 4 sequences in micro-batches of 1: 2 per process, so gradients also accumulate without sync
ARGS = ["--device=cpu", "--seq_len=32", "--batch_size=4", "--micro_batch_size=1", "--n_chunks=2",
        "--rollout_len=3", "--margin=2", "--warmup_seq_len=32", "--warmup_batch_size=4", "--eval_examples=2",
        "--eval_lengths=64", "--eval_batches=1", "--lr_warmup=0", "--n_needles=1", "--lr_schedule=constant"]
# the user's thread count (OMP_NUM_THREADS) reaches every process, 1 if unset: both runs of a comparison must use
# the same one (it decides how a kernel splits its sums), and torchrun would otherwise force 1
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
U = 2.0 ** -24   # unit roundoff of float32: one addition or multiplication errs by at most U times its result
N_MICRO = 4      # micro-batches per step, in both runs


def train(out_dir, *extra, processes=1, preset="toy"):
    """train.py (through this file's tap) -> (stdout, trace: one dict per optimiser step)."""
    trace = Path(out_dir) / f"trace-{processes}.pt"
    cmd = [__file__, str(trace), f"--preset={preset}", *ARGS, f"--out_dir={out_dir}", *extra]
    if processes > 1:
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}", *cmd]
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, torch.load(trace, weights_only=False)


def rows(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl") if '"step"' in line]


def ckpt(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=False)


def assert_same_step(a, b, ta, tb, before, cfg):
    """Run a (1 process) and run b (2 processes) took their last step from the same weights and AdamW state
    `before` (a checkpoint dict; None: a fresh model, whose weights the runs' own step-0 agree on)."""
    sa, sb = ta[-1], tb[-1]
    # the rewards: same weights, same micro-batch shapes, same kernels and thread count, so each process computes
    # every rollout's reward by the same float operations as the single process: equal exactly, rollout by rollout
    # (other rollout seeds, or another split of the batch, change them)
    assert sa["rewards"] is not None and torch.equal(sa["rewards"], sb["rewards"])
    # the NTP loss: the same per-micro-batch losses, added in float64 by one process; the 2 processes each round
    # their share to float32 and all-reduce them in float32: 3 roundings, at most 3 U relative
    ra, rb = rows(a)[-1], rows(b)[-1]
    assert abs(ra["ntp_loss"] - rb["ntp_loss"]) <= 3 * U * abs(ra["ntp_loss"])
    # the gradients before clipping: both runs add the same 4 per-micro-batch gradients g_i, in another order
    # (((g0 + g1) + g2) + g3 against (g0 + g1) + (g2 + g3); the x2 / 2 of the process average is exact): each of
    # the 3 additions errs by at most U x its partial sum, so they differ by at most 2 (N - 1) U sum_i |g_i| per
    # element, sum_i |g_i| measured in the 1-process run; where that is 0 they must be equal
    assert sa["grads"].keys() == sb["grads"].keys()
    for k, ga in sa["grads"].items():
        gap = (ga - sb["grads"][k]).abs()
        bound = 2 * (N_MICRO - 1) * U * sa["abs"][k]
        assert (gap <= bound).all(), f"{k}: gradient differs by {gap.max():.3e}, bound {bound.max():.3e}"
    # the weights after the step: torch's AdamW applied to each run's clipped gradient from the same state. The
    # updates differ by |u(g_a) - u(g_b)| (computed here in float64), plus each run's float32 rounding: of the
    # update, a few operations on m, g and v, each erring by U of its inputs (<= 8 U x the update's input size A,
    # below), and of the weight (<= 3 U of it: the decay factor 1 - lr wd is rounded to float32, then the product
    # and the subtraction; an element with no gradient under ATEN avx2 measured 1.06 x the 2 U of the last two)
    wa, wb = ckpt(a)["model"], ckpt(b)["model"]
    assert wa.keys() == wb.keys() == sa["grads"].keys()
    for k in wa:
        state = before["optimizer"]["state"][k] if before else None
        ua, size_a = adamw_update(sa["grads"][k] * sa["clip"], state, cfg)
        ub, size_b = adamw_update(sb["grads"][k] * sb["clip"], state, cfg)
        if before:  # from the checkpoint's weights and AdamW state: the resumed run took exactly that step
            w0 = before["model"][k].double() * (1 - cfg["lr"] * decay(k, cfg))
            assert ((w0 - ua - wa[k].double()).abs() <= 8 * U * size_a + 3 * U * wa[k].abs()).all(), k
        bound = (ua - ub).abs() + 8 * U * (size_a + size_b) + 3 * U * (wa[k].abs() + wb[k].abs())
        gap = (wa[k].double() - wb[k].double()).abs()
        assert (gap <= bound).all(), f"{k}: weights differ by {gap.max():.3e}"


def decay(name, cfg):
    return cfg["weight_decay"] if name in cfg["decayed"] else 0.0


def adamw_update(g, state, cfg):
    """(the update torch's AdamW subtracts after the weight decay, its input size lr / (1 - beta1^t) x (|m| + |g|) /
    denominator) in float64: g the clipped gradient, state the AdamW state before the step (None: the first)."""
    g = g.double()
    m, v, t = (0.0, 0.0, 1) if state is None else \
        (state["exp_avg"].double(), state["exp_avg_sq"].double(), int(state["step"]) + 1)
    v = cfg["beta2"] * v + (1 - cfg["beta2"]) * g * g
    step_size, denominator = cfg["lr"] / (1 - cfg["beta1"] ** t), (v / (1 - cfg["beta2"] ** t)).sqrt() + 1e-8
    update = step_size * (cfg["beta1"] * m + (1 - cfg["beta1"]) * g) / denominator
    return update, step_size * (abs(m) + g.abs()) / denominator


def adamw_cfg(out_dir):
    cfg = json.load(open(out_dir / "config.json"))["train"]
    cfg["decayed"] = {k for k, w in ckpt(out_dir)["model"].items() if w.dim() >= 2}   # step.make_optimizer's groups
    return cfg


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The 1-process run of a preset: one REFINE step from a fresh model (made once)."""
    runs = {}

    def run(preset):
        if preset not in runs:
            out = tmp_path_factory.mktemp(preset)
            runs[preset] = out, train(out, "--warmup_steps=0", "--max_steps=1", preset=preset)[1]
        return runs[preset]
    return run


@pytest.mark.parametrize("preset,mode", [("toy", "ddp"), ("toy", "fsdp"), ("toy-lact", "fsdp"), ("toy-gdn", "ddp"),
                                         ("toy-gdn", "fsdp")])
def test_two_processes_equal_one(preset, mode, one, tmp_path):
    """One REFINE step from a fresh model (the same weights in both runs: the model of --seed)."""
    out, t2 = train(tmp_path, "--warmup_steps=0", "--max_steps=1", f"--parallel={mode}", processes=2, preset=preset)
    assert f"processes: 2 ({mode})" in out and "validation: loss" in out
    assert [r["phase"] for r in rows(tmp_path)] == ["refine"] and (tmp_path / "hf" / "model.safetensors").exists()
    a, t1 = one(preset)
    assert len(t1) == len(t2) == 1
    assert_same_step(a, tmp_path, t1, t2, None, adamw_cfg(a))


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    """2 FSDP2 processes write one full checkpoint after a warm-up step and a REFINE step; 1 process resumes it for
    a 3rd step and takes the step that 2 FSDP2 processes take from the same checkpoint."""
    first, one, two = tmp_path / "first", tmp_path / "one", tmp_path / "two"
    train(first, "--warmup_steps=1", "--max_steps=1", "--parallel=fsdp", processes=2)
    before = ckpt(first)
    assert before["step"] == 2 and [r["phase"] for r in rows(first)] == ["warmup", "refine"]
    assert before["optimizer"]["state"].keys() == before["model"].keys()   # the full AdamW state, by name
    shutil.copytree(first, one)
    shutil.copytree(first, two)
    _, t1 = train(one, "--warmup_steps=1", "--max_steps=2", "--resume")
    _, t2 = train(two, "--warmup_steps=1", "--max_steps=2", "--resume", "--parallel=fsdp", processes=2)
    assert [r["phase"] for r in rows(one)] == [r["phase"] for r in rows(two)] == ["warmup", "refine", "refine"]
    assert ckpt(one)["step"] == ckpt(two)["step"] == 3
    assert_same_step(one, two, t1, t2, before, adamw_cfg(one))


# ------------------------------------------------------------------------------------------ the tap

def traced_main(trace_path, argv):
    """train.main(argv), recording per optimiser step the full gradients before clipping, the clip factor, the
    rewards of all processes and (1 process) the sum of |per-micro-batch gradient| of every element."""
    import step as steplib
    import train as trainlib
    trace, names, abs_sum = [], {}, {}
    parallelize, train_step, clip = trainlib.parallelize, trainlib.train_step, torch.nn.utils.clip_grad_norm_

    def tapped_parallelize(model, cfg, world, device):
        wrapped = parallelize(model, cfg, world, device)
        for name, p in model.named_parameters():   # after fully_shard: the sharded parameters, same names
            names[id(p)] = name
            if world == 1:  # each backward hands a leaf its whole gradient of that micro-batch
                p.register_hook(lambda g, name=name: abs_sum.__setitem__(name, abs_sum.get(name, 0) + g.abs()))
        return wrapped

    def tapped_clip(params, max_norm, *args, **kwargs):
        params = [p for p in params if p.grad is not None]
        grads = {names[id(p)]: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for p in params}   # FSDP2: every process gathers, in the same order
        norm = clip(params, max_norm, *args, **kwargs)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        trace.append({"grads": grads, "clip": min(1.0, max_norm / (full.item() + 1e-6)),   # as clip_grad_norm_
                      "abs": dict(abs_sum), "rewards": None})
        abs_sum.clear()
        return norm

    def tapped_step(*args, **kwargs):
        stats = train_step(*args, **kwargs)
        if stats and stats["rewards"]:
            trace[-1]["rewards"] = torch.cat(stats["rewards"])
        return stats

    trainlib.parallelize, trainlib.train_step, torch.nn.utils.clip_grad_norm_ = \
        tapped_parallelize, tapped_step, tapped_clip
    assert steplib.torch.nn.utils.clip_grad_norm_ is tapped_clip   # step.py looks it up at call time
    code = trainlib.main(argv)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(trace, trace_path)
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(traced_main(sys.argv[1], sys.argv[2:]))
