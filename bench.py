"""Speed checks, measured side by side in one run. Prints `name: value` lines (times in ms, ratios unitless).

    python bench.py kernel    # delta rule: recurrent vs chunked torch (CPU); Triton vs torch (vs fla) on CUDA
    python bench.py decode    # per-token decoding cost vs context length; LaCT recompute vs incremental
    python bench.py refine    # one NTP step vs one REFINE step (snapshot rollouts) vs REFINE (reforward rollouts)
    python bench.py all
"""
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kernels import delta_rule


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in ms (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def report(name, value):
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def delta_inputs(B, T, H, K, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v, beta = torch.randn(B, T, H, V, generator=g), torch.rand(B, T, H, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, beta)]


def fwd_bwd(backend, inputs):
    def run():
        o, _ = backend(*inputs)
        o.sum().backward()
    return run


def bench_kernel():
    torch.manual_seed(0)
    inputs = delta_inputs(1, 4096, 4, 64, 64, torch.float32, "cpu")
    rec = timeit(fwd_bwd(lambda *a: delta_rule(*a, backend="recurrent"), inputs), repeat=3)
    chk = timeit(fwd_bwd(lambda *a: delta_rule(*a, backend="torch"), inputs), repeat=5)
    report("cpu_recurrent_fwd_bwd_ms (B=1 T=4096 H=4 K=V=64 fp32)", rec)
    report("cpu_chunked_fwd_bwd_ms", chk)
    report("recurrent_over_chunked", rec / chk)
    if not torch.cuda.is_available():
        report("cuda", "not available: Triton timings skipped")
        return
    report("cuda_device", torch.cuda.get_device_name())
    inputs = delta_inputs(4, 8192, 16, 128, 128, torch.bfloat16, "cuda")
    paths = {"triton": lambda *a: delta_rule(*a, backend="triton"), "torch": lambda *a: delta_rule(*a, backend="torch")}
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # optional, never a dependency
        paths["fla"] = lambda q, k, v, b: chunk_delta_rule(q, k, v, b)
    except ImportError:
        report("fla", "not installed: fla comparison skipped")
    times = {}
    for name, fn in paths.items():
        with torch.no_grad():
            times[name, "fwd"] = timeit(lambda: fn(*inputs), repeat=10)
        times[name, "fwd_bwd"] = timeit(fwd_bwd(fn, inputs), repeat=10)
        report(f"cuda_{name}_fwd_ms (B=4 T=8192 H=16 K=V=128 bf16)", times[name, "fwd"])
        report(f"cuda_{name}_fwd_bwd_ms", times[name, "fwd_bwd"])
    report("torch_over_triton_fwd_bwd", times["torch", "fwd_bwd"] / times["triton", "fwd_bwd"])
    if "fla" in paths:
        report("triton_over_fla_fwd", times["triton", "fwd"] / times["fla", "fwd"])
        report("triton_over_fla_fwd_bwd", times["triton", "fwd_bwd"] / times["fla", "fwd_bwd"])


@torch.no_grad()
def decode_ms_per_token(model, context, new_tokens=32):
    """Per-token decoding time after a prefill of `context` tokens."""
    ids = torch.randint(0, 256, (1, context))
    _, state = model.prefill(ids)
    tok = ids[:, -1:]

    def run():
        s = state
        for _ in range(new_tokens):
            s = model.step(tok, s).state
    return timeit(run, repeat=3) / new_tokens


def bench_decode():
    from model import build_model
    torch.manual_seed(0)
    for arch in ("deltanet", "lact"):
        model = build_model(f"toy-{arch}").eval()
        short, long = decode_ms_per_token(model, 4096), decode_ms_per_token(model, 16384)
        report(f"decode_ms_per_token_{arch}_4096", short)
        report(f"decode_ms_per_token_{arch}_16384", long)
        report(f"decode_growth_{arch}", long / short)
    model = build_model("toy-lact").eval()
    ids = torch.randint(0, 256, (1, 4096))
    with torch.no_grad():
        recompute = timeit(lambda: model(ids), repeat=3)  # the reference's way: the whole sequence per new token
    incremental = decode_ms_per_token(model, 4096)
    report("lact_recompute_ms_per_token_4096", recompute)
    report("lact_incremental_ms_per_token_4096", incremental)
    report("lact_recompute_over_incremental", recompute / incremental)


def bench_refine():
    from config import TrainConfig
    from train import make_optimizer, train_step
    from model import build_model
    torch.manual_seed(0)
    cfg = TrainConfig(n_chunks=8, rollout_len=5, n_rollouts=1, batch_size=2, seq_len=2048, eos_id=-1, lr=1e-4)
    model = build_model("toy-deltanet")
    opt = make_optimizer(model, cfg)
    batch = torch.randint(0, 256, (2, 2049))
    model.train()
    step = lambda refine, mode: train_step(model, opt, batch, SimpleNamespace(**{**vars(cfg), "rollout_mode": mode}),
                                          0, 0, 1, refine)
    ntp = timeit(lambda: step(False, "snapshot"), repeat=5)
    snap = timeit(lambda: step(True, "snapshot"), repeat=5)
    refw = timeit(lambda: step(True, "reforward"), repeat=3)
    report("ntp_step_ms (toy DeltaNet, B=2, T=2048)", ntp)
    report("refine_snapshot_step_ms (c=8, k=5, n=1)", snap)
    report("refine_reforward_step_ms", refw)
    report("snapshot_over_ntp", snap / ntp)
    report("reforward_over_snapshot", refw / snap)


if __name__ == "__main__":
    jobs = {"kernel": bench_kernel, "decode": bench_decode, "refine": bench_refine}
    which = sys.argv[1:] or ["all"]
    for name in which:
        if name not in (*jobs, "all"):
            print(f"bench.py: error: unknown benchmark {name!r}; choose kernel, decode, refine or all", file=sys.stderr)
            sys.exit(2)
    for name, job in jobs.items():
        if name in which or "all" in which:
            job()
