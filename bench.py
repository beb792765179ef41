"""Speed checks, measured side by side in one run. Prints `name: value` lines (times in ms, ratios unitless).

    python bench.py kernel    # delta rule fwd+bwd: recurrent vs chunked torch (CPU); Triton vs torch (vs fla) on CUDA
    python bench.py decode    # per-token decoding at 4K vs 16K context (interleaved); LaCT recompute vs incremental
    python bench.py refine    # NTP vs REFINE step, piece by piece: B=2 T=2048 (and reforward), toy preset B=16 T=256
    python bench.py all       # kernel, decode and refine (runs on a laptop CPU)
    python bench.py gpu       # one CUDA GPU: kernel tests and timings, 1.3B steps, train.py, in one run
    python bench.py gpu --dry-run --out=DIR   # its every step on the CPU at tiny shapes; DIR: gpu.log, gpu.json
    python bench.py gpu-readme --from=DIR/gpu.json   # that run -> results/gpu.json and the README's GPU table
    python bench.py compile   # no GPU: every Triton kernel compiled for sm_80/89/90 in bf16/fp16/fp32, fits or exit 1
    python bench.py kernel refine   # several at once; -h / --help prints this text
    python bench.py all --readme    # also results/bench.json and the README's Benchmarks table from this run
"""
import sys
from contextlib import nullcontext, redirect_stdout

import torch

from benchmarks.common import fail
from benchmarks.cpu import bench_decode, bench_kernel, bench_refine
from benchmarks.gpu import bench_compile, bench_gpu
from benchmarks.readme import Tee, write_gpu_readme, write_readme


def main(argv):
    jobs = {"kernel": bench_kernel, "decode": bench_decode, "refine": bench_refine, "gpu": bench_gpu,
            "compile": bench_compile}
    options = {a.partition("=")[0]: a.partition("=")[2] for a in argv if a.startswith("--") and a not in ("--help",)}
    for key in options:
        if key not in ("--readme", "--dry-run", "--out", "--ruler", "--from"):
            fail(f"bench.py: error: unknown option {key}; the options are --readme, with gpu --dry-run, --out=DIR "
                 f"and --ruler=FILE, with gpu-readme --from=FILE (--help)", 2)
    readme = "--readme" in options   # also write results/bench.json and the README's Benchmarks table from this run
    dry_run = "--dry-run" in options
    which = [a for a in argv if not a.startswith("--") or a == "--help"] or ["all"]
    if "-h" in which or "--help" in which:
        print(__doc__.strip())
        return
    for name in which:
        if name not in (*jobs, "all", "gpu-readme"):
            fail(f"bench.py: error: unknown benchmark {name!r}; choose kernel, decode, refine, all, gpu, gpu-readme "
                 f"or compile (--help lists them)", 2)
    if "gpu-readme" in which:
        if not options.get("--from"):
            fail("bench.py gpu-readme: error: no run given; --from=DIR/gpu.json (what python bench.py gpu --out=DIR "
                 "wrote)", 2)
        return write_gpu_readme(options["--from"])
    if "gpu" in which and not dry_run and not torch.cuda.is_available():
        fail("bench.py gpu: error: no CUDA device (torch.cuda.is_available() is False); it needs one GPU (or "
             "--dry-run: every step on the CPU at tiny shapes)", 2)
    tee = Tee(sys.stdout)
    with redirect_stdout(tee) if readme else nullcontext():
        for name, job in jobs.items():
            if name == "gpu" and "gpu" in which:
                failed = bench_gpu(dry_run, options.get("--out") or None, options.get("--ruler") or None)
                if failed:
                    fail(f"bench.py gpu: error: these steps failed: {', '.join(failed)} (see above)", 1)
            elif name in which or ("all" in which and name not in ("gpu", "compile")):
                job()
    if readme:
        write_readme(argv, "".join(tee.parts).splitlines())


if __name__ == "__main__":
    main(sys.argv[1:])
