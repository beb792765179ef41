"""What every benchmark uses: the clock, medians, `name: value` reporting, the delta rule's inputs, side-by-side
timing."""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]   # the repository root


def clock():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() * 1e3


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in ms over `repeat` calls, after `warmup` untimed ones (CUDA synchronised)."""
    times = []
    for _ in range(warmup + repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times[warmup:])


def report(name, value):
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def write_whole(path, text):
    """path <- text by way of a temporary file beside it, renamed: a reader, or a run killed meanwhile, finds the
    previous file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fail(message, code):  # code 2: cannot run here or bad input; 1: a check failed
    print(message, file=sys.stderr)
    sys.exit(code)


def delta_inputs(B, T, H, K, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1) for _ in range(2))  # [B, T, H, K] unit rows
    v, beta = torch.randn(B, T, H, V, generator=g), torch.rand(B, T, H, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, beta)]


def log_decay(B, T, H, device, low=-0.5):
    """Gated DeltaNet's g [B, T, H] ~ U(low, 0), fp32 (as the layer makes it), a leaf that takes gradients."""
    g = torch.rand(B, T, H, generator=torch.Generator(device="cpu").manual_seed(1)) * low
    return g.to(device).requires_grad_()


def fwd_bwd(fn, inputs, **kwargs):
    def run():  # loss = sum(o), plus the sum of the states after the positions when snapshot_at= is given
        o, _, *snaps = fn(*inputs, **kwargs)
        (o.sum() + sum(s.sum() for s in snaps)).backward()
    return run


def side_by_side(slow, fast, rounds=3, fast_repeat=3):
    """slow() once and fast() fast_repeat times per round, alternating after one untimed call of each, so that a
    drift of a shared machine hits both alike. -> (median ms of slow, of fast, median over rounds of slow / fast)"""
    slow(), fast()
    pairs = [(timeit(slow, repeat=1, warmup=0), timeit(fast, repeat=fast_repeat, warmup=0)) for _ in range(rounds)]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(a / b for a, b in pairs))


def machine_line():
    """The CPU model, cores, torch version, CPU capability, threads (and the GPU): what every timing hangs on."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
