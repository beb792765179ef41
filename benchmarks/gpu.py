"""The GPU run (`bench.py gpu`, and its --dry-run on the CPU), 1.3B-scale train steps, and the compile check of
every Triton kernel for sm_80/89/90 without a GPU (`bench.py compile`)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, redirect_stdout
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from benchmarks.common import ROOT, fail, report, write_whole
from benchmarks.cpu import interleaved_steps, kernel_timings
from benchmarks.readme import Tee, run_record
from kernels import resolve_backend


def bench_train_steps(model_name="deltanet-1.3b", seq_len=16384, device="cuda", repeat=2, prefix="", **overrides):
    """NTP and REFINE (snapshot rollouts) steps of the model preset on one sequence, with gradient checkpointing and
    bf16 autocast by default, as the paper's mid-training runs per GPU: breakdown, tokens/s and peak memory. Every
    line's name starts with `prefix`."""
    from config import TrainConfig
    from model import build_model
    torch.manual_seed(0)
    with torch.device(device):  # the weights are created where they run (fast init of 1.3B parameters on a GPU)
        model = build_model(model_name, gradient_checkpointing=True)
    cfg = replace(TrainConfig(model=model_name, seq_len=seq_len, batch_size=1, dtype="bfloat16", lr=1e-6, eos_id=-1,
                              gradient_checkpointing=True), **overrides)  # c=8, k=5, n=1 by default
    batch = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), device=device)
    report(f"{prefix}parameters ({model_name})", model.num_parameters())
    report(f"{prefix}snapshot_delta_backend", resolve_backend(model.config.delta_backend, batch.float()))
    results = interleaved_steps(model, batch, {f"{prefix}ntp": (cfg, False), f"{prefix}refine": (cfg, True)}, repeat, 1,
                                f"{model_name} T={seq_len} {cfg.dtype} checkpointing, medians of {repeat}")
    for name, r in results.items():
        report(f"{name}_tokens_per_s", r["tokens_per_s"])
        if r["peak_mem_gib"] is not None:
            report(f"{name}_peak_mem_gib", r["peak_mem_gib"])
    if len(results) == 2:
        report(f"{prefix}refine_over_ntp_step",
               results[f"{prefix}refine"]["step_ms"] / results[f"{prefix}ntp"]["step_ms"])
    return results


def run_kernel_tests(name, selection, interpret=False, probe=None):
    """pytest in a fresh process over `selection` (the kernel tests' file with a -k expression, or the node ids of
    tests), compiled on CUDA or in Triton's interpreter; probe: a benchmarks/launch_probe.py variant to run them
    under. Reports the summary line as `name: ...`. -> the node ids of the failed tests; a run that fails without
    naming a failed test (it did not start, or crashed) raises."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REFINE_LAUNCH_PROBE")}
    env.update({"TRITON_INTERPRET": "1"} if interpret else {})  # else compiled kernels where CUDA is
    env.update({"REFINE_LAUNCH_PROBE": probe} if probe else {})
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
           *(["-p", "benchmarks.launch_probe"] if probe else []), *selection]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    report(name, (run.stdout.strip().splitlines() or ["no output"])[-1].strip("= "))
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")]
    if run.returncode != 0:
        print(run.stdout[-3000:] + run.stderr[-2000:], file=sys.stderr)
    if run.returncode != 0 and not failed:
        raise RuntimeError(f"pytest exited {run.returncode} (see above)")
    return failed


def sanitize(test, tool, out_dir=None, timeout=150):
    """One kernel test (a pytest node id) under NVIDIA's compute-sanitizer --tool `tool` (memcheck: out-of-bounds and
    misaligned accesses, naming the kernel; racecheck: shared-memory hazards), reported as `sanitizer_<tool>: its
    ERROR SUMMARY; its first error`; the whole report in out_dir/sanitizer_<tool>.log."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/cuda/bin"])
    exe = shutil.which("compute-sanitizer", path=path)
    if exe is None:
        return report(f"sanitizer_{tool}", "skipped: no compute-sanitizer on this machine")
    cmd = [exe, "--tool", tool, "--print-limit", "5", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           test]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group: a timeout stops the test under it too
    try:
        text = run.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        text = run.communicate()[0] + f"\n========= timed out after {timeout} s\n"   # what it printed so far
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"sanitizer_{tool}.log").write_text(text)
    lines = [line.removeprefix("=========").strip() for line in text.splitlines() if line.startswith("=========")]
    summary = next((line for line in lines if line.startswith(("ERROR SUMMARY", "timed out"))), "no summary")
    first = next((line for line in lines if line.startswith(("Invalid", "Error", "Race", "Program hit"))), "no error")
    report(f"sanitizer_{tool}", f"{summary}; {first}")


def bench_gpu(dry_run=False, out_dir=None, ruler=None):
    """Everything that needs a GPU, in one run (meant for a 10-minute call; each step's seconds are recorded):
    1. the compiled kernel tests in bf16 (tests/test_triton_kernel.py: forward, backward, snapshots, the gated rule);
    2. kernel_timings at B=4 T=8192 H=16 K=V=128 bf16, and at Gated DeltaNet-1.3B's heads (H=6, K=256, V=512);
    3. NTP and REFINE steps of DeltaNet-1.3B, Gated DeltaNet-1.3B and LaCT-760M on one 16K-token sequence;
    4. train.py itself: 2 steps of deltanet-1.3b-mid (random init, built-in data, 4K tokens), then --resume to step 3;
       then evaluate.py --task ruler on `ruler` (a RULER parquet file; skipped, with the reason, without one);
    5. the kernel tests in fp16 and fp32, then every failed kernel test again under each launch_probe variant, and
       the first one under compute-sanitizer's memcheck and racecheck (sanitizer_*.log in out_dir).
    dry_run: the same steps on the CPU at tiny shapes (toy models, Triton in the interpreter), so that the GPU run
    can only fail on what only a GPU shows. out_dir: gpu.log and gpu.json (write_run: the `name: value` lines so far),
    rewritten after each step, so that a run cut short keeps what it measured. A failing step is reported and the
    others still run. -> the names of the failed steps"""
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import, where this process makes it
    from triton import __version__ as triton_version  # requirements.txt has it; the kernels need it on CUDA
    device = "cpu" if dry_run else "cuda"
    start, failed, tee = time.perf_counter(), [], Tee(sys.stdout)
    command = "python bench.py gpu" + " --dry-run" * dry_run + (f" --ruler={ruler}" if ruler else "")
    with redirect_stdout(tee):  # what the run ran on: the first lines of gpu.log and gpu.json
        report("device", "the CPU (dry run: tiny shapes, Triton in the interpreter)" if dry_run
               else torch.cuda.get_device_name())
        report("versions", f"torch {torch.__version__}, triton {triton_version}, cuda {torch.version.cuda}")
    models = [("deltanet-1.3b", "toy-deltanet", "deltanet_"), ("gated-deltanet-1.3b", "toy-gdn", "gdn_"),
              ("lact-760m", "toy-lact", "lact_")]
    shapes = [((1, 40, 2, 16, 16), torch.float32)] if dry_run else [((4, 8192, 16, 128, 128), torch.bfloat16),
                                                                   ((1, 16384, 6, 256, 512), torch.bfloat16)]
    train = ["--preset", "deltanet-1.3b-mid", "--data=synthetic", "--tokenizer=word", "--seq_len=4096",
             "--batch_size=4", "--ppo_mini_batch=2", "--eval_examples=4", "--eval_lengths=4096"]
    if dry_run:
        train = ["--preset", "toy", "--device=cpu", "--warmup_steps=0", "--seq_len=64", "--batch_size=2",
                 "--eval_examples=2", "--eval_lengths=64"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "train"

        failed_tests = []
        tests, few = "tests/test_triton_kernel.py", "single_token or (gated and edges and strong)"  # few: the dry run's

        def kernel_tests(name, on_gpu, on_cpu):  # -k expressions: the compiled tests, the dry run's few
            failed = run_kernel_tests(name, [tests, "-k", on_cpu if dry_run else on_gpu], dry_run)
            failed_tests.extend(failed)
            if failed:
                raise RuntimeError(f"{len(failed)} kernel tests failed (see above)")

        def launch_probe():  # the failed tests again under each other launch configuration (the dry run: a few)
            if not failed_tests and not dry_run:
                return report("launch_probe", "skipped: no kernel test failed")
            for variant in ("min32", "one_stage"):
                run_kernel_tests(f"launch_probe_{variant}", sorted(set(failed_tests)) or [tests, "-k", few], dry_run,
                                 variant)

        def sanitizer():  # the first failed test under memcheck and racecheck (the dry run: where no sanitizer is)
            if not failed_tests and not dry_run:
                return report("sanitizer", "skipped: no kernel test failed")
            for tool in ("memcheck", "racecheck"):
                sanitize(failed_tests[0] if failed_tests else f"{tests}::test_single_token_by_hand", tool, out_dir)

        def train_and_resume():
            for name, n, extra in (("train", 2, []), ("train_resume", 3, ["--resume"])):
                run_script(name, "train.py", *train, f"--out_dir={ckpt}", f"--max_steps={n}", *extra)

        def ruler_qa():
            if ruler is None:
                return report("ruler", "skipped: no --ruler=FILE given")
            run_script("evaluate_ruler", "evaluate.py", "--ckpt", str(ckpt), "--task", "ruler", "--data", ruler,
                       "--limit", "2" if dry_run else "20", "--device", device)

        steps = {"kernel_tests": lambda: kernel_tests("kernel_tests_bf16", "cuda-bf16", few),
                 "kernel_timings": lambda: [kernel_timings(*shape, dtype, device, repeat=1 if dry_run else 5)
                                            for shape, dtype in shapes],
                 "train_steps": lambda: [bench_train_steps(toy if dry_run else name, 64 if dry_run else 16384, device,
                                                           repeat=1 if dry_run else 2, prefix=prefix)
                                         for name, toy, prefix in models],
                 "train_and_resume": train_and_resume, "ruler": ruler_qa,
                 # last, so that a run cut short has the figures above: fp16 and fp32 (TF32) compiled, then the probe
                 "kernel_tests_fp16_fp32": lambda: kernel_tests("kernel_tests_fp16_fp32", "cuda-fp16 or cuda-fp32",
                                                                "snapshots_match and no-h0-edges and direct"),
                 "launch_probe": launch_probe,
                 "sanitizer": sanitizer}
        with redirect_stdout(tee):
            for name, step in steps.items():
                step_start = time.perf_counter()
                try:
                    step()
                except Exception as err:  # noqa: BLE001  the others still run; the error is the step's result
                    report(f"{name}_failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    failed.append(name)
                report(f"{name}_s", time.perf_counter() - step_start)   # what each step costs, for the next run
                if out_dir:
                    write_run(Path(out_dir), "gpu", command, "".join(tee.parts))
            report("gpu_bench_total_s", time.perf_counter() - start)
    if out_dir:
        write_run(Path(out_dir), "gpu", command, "".join(tee.parts))
    return failed


def run_script(name, script, *args):
    """python script args in a fresh process from the repository root; reported as `name: exit N: line`, the line
    its last `step` line (else its last line) or, on failure, its last error line, which a non-zero exit raises."""
    run = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    lines = run.stdout.strip().splitlines() or run.stderr.strip().splitlines() or ["no output"]
    last = next((line for line in lines[::-1] if line.startswith("step ")), lines[-1]) if not run.returncode \
        else (run.stderr.strip().splitlines() or lines)[-1]
    report(name, f"exit {run.returncode}: {last}")
    if run.returncode:
        print(run.stderr[-2000:], file=sys.stderr)
        raise RuntimeError(f"{script} exited {run.returncode}: {last}")


def write_run(out, name, command, text):
    """out/<name>.log (everything printed) and out/<name>.json (readme.run_record: command, date, its `name: value`
    lines; `python bench.py gpu-readme --from=` turns it into the README's GPU table), each by write_whole: a killed
    run leaves each file whole."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, content in (("log", text), ("json", json.dumps(run_record(command, text.splitlines()), indent=1))):
        write_whole(out / f"{name}.{suffix}", content)


GPU_TARGETS = {80: ("A100", 163), 89: ("L40/RTX4090", 99), 90: ("H100/H200", 227)}


def recorded_launches(dtype, K=128, V=128, H=16, T=2048, chunk=64,
                      variants=("plain", "snapshots", "gated", "gated_snapshots")):
    """Every Triton launch of one forward and backward at the 1.3B model's head size, as kernels/ issues them, recorded
    on the CPU instead of run: {(name, variant): (kernel, args, kwargs)}. "plain": NTP; "snapshots": REFINE (fp32
    chunk states, an initial state, gradients into the final state, the chunk states and the rows of V'); "gated",
    "gated_snapshots": the same two with Gated DeltaNet's log-decay (the GATED kernels)."""
    import triton
    from kernels import triton_delta as td, triton_delta_bwd as tdb
    kernels = {n: f for m in (td, tdb) for n, f in vars(m).items() if n.endswith("_kernel")}
    assert all(isinstance(f, triton.JITFunction) for f in kernels.values()), "unset TRITON_INTERPRET to compile"
    launches, variant = {}, None

    def recorder(name, kernel):
        def run(*args, grid, warmup, **kwargs):  # what kernel[grid](*args, **kwargs) calls: recorded, not run
            launches[name, variant] = (kernel, args, kwargs)
        return run

    with ExitStack() as patches:  # an instance attribute hiding JITFunction.run, deleted on exit
        for name, kernel in kernels.items():
            patches.enter_context(mock.patch.object(kernel, "run", recorder(name, kernel)))
        for variant in variants:
            snap = variant.endswith("snapshots")
            q, k = (torch.empty(1, T, H, K, dtype=dtype) for _ in range(2))  # [B, T, H, K]
            v, beta = torch.empty(1, T, H, V, dtype=dtype), torch.empty(1, T, H, dtype=dtype)
            h0 = torch.empty(1, H, K, V) if snap else None                    # [B, H, K, V] fp32
            gc = torch.empty(1, T, H) if variant.startswith("gated") else None  # G [B, T, H] fp32
            o, ht, (T_mat, w, h, v_new) = td.chunk_delta_rule_fwd(q, k, v, beta, K ** -0.5, h0, snap, chunk,
                                                                  torch.float32 if snap else None, gc)
            tdb.chunk_delta_rule_bwd(q, k, v, beta, K ** -0.5, torch.empty_like(o), ht, T_mat, w, h, v_new, chunk,
                                     snap, torch.empty_like(h) if snap else None, v_new if snap else None, gc)
    return launches


def resource_usage(compiled):
    """(registers, local memory bytes) per thread of a compiled kernel, from its cubin by triton's cuobjdump (n_regs
    and n_spills need a GPU). Local memory: the stack frame (spills; no local arrays here) plus other local data."""
    import triton.backends.nvidia
    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(name + r":(\d+)", usage)[1])
    return field("REG"), field("STACK") + field("LOCAL")


def compile_check(capabilities=tuple(GPU_TARGETS), dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """Compile every Triton kernel as its launcher would launch it, per CUDA target and dtype, as JITFunction.run does
    (its binder: dtypes, 16-byte alignment and divisibility of the integers; then triton.compile), with no GPU.
    -> rows (sm, dtype, kernel, variant, shared bytes, shared limit bytes, registers, local bytes, fits)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    rows = []
    for dtype in dtypes:  # DeltaNet-1.3B's heads (K = V = 128), and Gated DeltaNet-1.3B's (K = 256, V = 512) gated
        wide = recorded_launches(dtype, K=256, V=512, H=6, variants=("gated", "gated_snapshots"))
        launches, seen = {**recorded_launches(dtype), **{(n, v + "_K256_V512"): x for (n, v), x in wide.items()}}, {}
        for sm in capabilities:
            target = GPUTarget("cuda", sm, 32)
            backend = make_backend(target)
            for (name, variant), (kernel, args, kwargs) in launches.items():
                bind = create_function_from_signature(kernel.signature, kernel.params, backend)
                options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, *bind(*args, **kwargs))
                c = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=options.__dict__)
                if variant != "plain" and c.hash in seen.get((sm, name), ()):
                    continue  # the same binary as an earlier variant's (no flag or dtype of this kernel differs)
                seen.setdefault((sm, name), set()).add(c.hash)
                limit = GPU_TARGETS[sm][1] * 1024
                rows.append((sm, str(dtype).removeprefix("torch."), name, variant, c.metadata.shared, limit,
                             *resource_usage(c), c.metadata.shared <= limit))  # ..., registers, local bytes, fits
    return rows


def bench_compile():
    """The compile check's table; exits 1 if a kernel does not fit a card."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as err:
        fail(f"bench.py compile: error: triton's NVIDIA backend does not import ({err}); pip install triton", 2)
    start = time.perf_counter()
    rows = compile_check()
    print(f"{'target':<22} {'dtype':<9} {'kernel':<30} {'variant':<26} {'smem KB':>8} {'limit':>6} {'regs':>5} "
          f"{'local B':>7}")
    for sm, dtype, name, variant, shared, limit, regs, local, fits in rows:
        print(f"{f'sm_{sm} {GPU_TARGETS[sm][0]}':<22} {dtype:<9} {name:<30} {variant:<26} {shared / 1024:>8.1f} "
              f"{limit // 1024:>6} {regs:>5} {local:>7}{'' if fits else '  DOES NOT FIT'}")
    report("compile_kernels", len(rows))
    report("compile_max_smem_kb_by_target", ", ".join(
        f"sm_{sm} {max(r[4] for r in rows if r[0] == sm) / 1024:.1f}/{GPU_TARGETS[sm][1]}" for sm in GPU_TARGETS))
    report("compile_kernels_with_local_memory (spills)", sum(r[7] > 0 for r in rows))
    report("compile_s", time.perf_counter() - start)
    if not all(r[8] for r in rows):
        fail("bench.py compile: error: a kernel needs more shared memory than its card has (see above)", 1)
