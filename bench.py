"""Speed checks, measured side by side in one run. Prints `name: value` lines (times in ms, ratios unitless).

    python bench.py kernel    # delta rule fwd+bwd: recurrent vs chunked torch (CPU); Triton vs torch (vs fla) on CUDA
    python bench.py decode    # per-token decoding cost at 4K vs 16K context (interleaved); LaCT recompute vs incremental
    python bench.py refine    # NTP vs REFINE step, piece by piece: B=2 T=2048 (and reforward), the toy preset's B=16 T=256
    python bench.py all       # kernel, decode and refine (runs on a laptop CPU)
    python bench.py gpu       # one CUDA GPU, < 10 min on an H100: kernel tests and timings, 1.3B steps, train.py
    python bench.py gpu --dry-run --out=DIR   # its every step on the CPU at tiny shapes; DIR: gpu.log, gpu.json
    python bench.py compile   # no GPU: every Triton kernel compiled for sm_80/89/90 in bf16/fp16/fp32, fits or exit 1
    python bench.py kernel refine   # several at once; -h / --help prints this text
    python bench.py all --readme    # also results/bench.json and the README's Benchmarks table from this run
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stdout
from dataclasses import replace
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from kernels import delta_rule, resolve_backend


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


def bench_kernel():
    torch.manual_seed(0)
    inputs = delta_inputs(1, 4096, 4, 64, 64, torch.float32, "cpu")
    g, zero = log_decay(1, 4096, 4, "cpu"), torch.zeros(1, 4096, 4, requires_grad=True)  # Gated DeltaNet
    for prefix, what, gate in (("", "B=1 T=4096 H=4 K=V=64 fp32", None), ("gated_", "the same, g ~ U(-0.5, 0)", g)):
        rec, chk, ratio = side_by_side(fwd_bwd(partial(delta_rule, backend="recurrent", g=gate), inputs),
                                       fwd_bwd(partial(delta_rule, backend="torch", g=gate), inputs))
        report(f"cpu_{prefix}recurrent_fwd_bwd_ms ({what}; 3 rounds, each the loop once and the chunked form 3 "
               f"times)", rec)
        report(f"cpu_{prefix}chunked_fwd_bwd_ms", chk)
        report(f"{prefix}recurrent_over_chunked (the median of the rounds' ratios)", ratio)
    chk0, chk, ratio = side_by_side(fwd_bwd(partial(delta_rule, backend="torch", g=zero), inputs),
                                    fwd_bwd(partial(delta_rule, backend="torch"), inputs), rounds=5, fast_repeat=1)
    report("chunked_gate_cost (g=0 over g=None, 5 alternating rounds; g=None runs the operations it ran before the "
           "gate)", ratio)
    if not torch.cuda.is_available():
        report("cuda", "not available: Triton timings skipped")
        return
    report("cuda_device", torch.cuda.get_device_name())
    kernel_timings(4, 8192, 16, 128, 128, torch.bfloat16, "cuda", repeat=10)


def kernel_timings(B, T, H, K, V, dtype, device, backends=("torch", "triton"), repeat=5, n_snapshots=8):
    """Median forward and forward+backward ms of the delta rule per backend (and of fla's chunk_delta_rule when it
    imports), forward+backward with n_snapshots snapshots per sequence (REFINE's case) and of the gated rule (Gated
    DeltaNet, against fla's chunk_gated_delta_rule when it imports). -> {(name, kind): ms}"""
    inputs, g = delta_inputs(B, T, H, K, V, dtype, device), log_decay(B, T, H, device)
    shape = f"B={B} T={T} H={H} K={K} V={V} {str(dtype).removeprefix('torch.')}"
    paths = {}
    for name in backends:
        try:
            resolve_backend(name, inputs[0])
            paths[name] = partial(delta_rule, backend=name)
        except ValueError as err:
            report(name, f"cannot run here, skipped: {err}")
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # optional, never a dependency
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        paths["fla"] = chunk_delta_rule
        fla_gated = lambda q, k, v, beta: chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta)  # fla: g first
    except ImportError:
        report("fla", "not installed: fla comparison skipped")
    positions = torch.linspace(0, T - 1, n_snapshots, device=device).long().expand(B, -1)  # [B, P]
    times = {}
    for name, fn in paths.items():
        with torch.no_grad():
            times[name, "fwd"] = timeit(lambda: fn(*inputs), repeat=repeat)
        times[name, "fwd_bwd"] = timeit(fwd_bwd(fn, inputs), repeat=repeat)
        report(f"{device}_{name}_fwd_ms ({shape})", times[name, "fwd"])
        report(f"{device}_{name}_fwd_bwd_ms", times[name, "fwd_bwd"])
        if name != "fla":
            times[name, "snap"] = timeit(fwd_bwd(fn, inputs, snapshot_at=positions), repeat=repeat)
            report(f"{device}_{name}_fwd_bwd_with_{n_snapshots}_snapshots_ms", times[name, "snap"])
        times[name, "gated"] = timeit(fwd_bwd(fla_gated if name == "fla" else partial(fn, g=g), inputs), repeat=repeat)
        report(f"{device}_{name}_gated_fwd_bwd_ms (g ~ U(-0.5, 0))", times[name, "gated"])
    if "torch" in paths and "triton" in paths:
        report("torch_over_triton_fwd_bwd", times["torch", "fwd_bwd"] / times["triton", "fwd_bwd"])
        report("torch_over_triton_fwd_bwd_with_snapshots", times["torch", "snap"] / times["triton", "snap"])
        report("torch_over_triton_gated_fwd_bwd", times["torch", "gated"] / times["triton", "gated"])
    if "fla" in paths and "triton" in paths:
        report("triton_over_fla_fwd", times["triton", "fwd"] / times["fla", "fwd"])
        report("triton_over_fla_fwd_bwd", times["triton", "fwd_bwd"] / times["fla", "fwd_bwd"])
        report("triton_over_fla_gated_fwd_bwd", times["triton", "gated"] / times["fla", "gated"])
    return times


@torch.no_grad()
def decode_ms_per_token(model, contexts, new_tokens=32, rounds=15):
    """Per-token decoding time after a prefill of each of `contexts` tokens, measured side by side: every round decodes
    new_tokens tokens after each context in turn (the order reversed every other round, one untimed round first), so
    a drift of a shared machine hits all contexts alike. -> ({context: median ms per token}, {context: median over
    rounds of its ms per token / the first context's in the same round})"""
    starts = {}
    for n in contexts:
        ids = torch.randint(0, 256, (1, n))
        starts[n] = model.prefill(ids)[1], ids[:, -1:]
    per_token = {n: [] for n in contexts}
    for r in range(rounds + 1):
        for n in (contexts if r % 2 == 0 else contexts[::-1]):
            s, tok = starts[n]
            start = clock()
            for _ in range(new_tokens):
                s = model.step(tok, s).state
            if r:
                per_token[n].append((clock() - start) / new_tokens)
    ratios = {n: statistics.median(t / t0 for t, t0 in zip(per_token[n], per_token[contexts[0]])) for n in contexts}
    return {n: statistics.median(t) for n, t in per_token.items()}, ratios


def bench_decode():
    from model import build_model
    torch.manual_seed(0)
    for arch, name in (("deltanet", "toy-deltanet"), ("gdn", "toy-gdn"), ("lact", "toy-lact")):
        model = build_model(name).eval()
        ms, growth = decode_ms_per_token(model, (4096, 16384))
        report(f"decode_ms_per_token_{arch}_4096 (medians of 15 interleaved rounds of 32 tokens)", ms[4096])
        report(f"decode_ms_per_token_{arch}_16384", ms[16384])
        report(f"decode_growth_{arch} (the median of the rounds' 16K / 4K ratios)", growth[16384])
    short = ms[4096]
    ids = torch.randint(0, 256, (1, 4096))  # the toy LaCT, the reference's way: the whole sequence per new token
    recompute = timeit(torch.no_grad()(lambda: model(ids)), repeat=3)
    report("lact_recompute_ms_per_token_4096", recompute)
    report("lact_incremental_ms_per_token_4096", short)
    report("lact_recompute_over_incremental", recompute / short)


class StepPieces:
    """Where the time of real step.train_step calls goes. While `active`, the functions train_step looks up at call
    time are wrapped (step/rollout/grpo attributes, the model's forward, Tensor.backward, the optimiser) and each
    piece's wall time, exclusive of the pieces nested in it, is added to `ms`. Decoding calls of the model count in
    their caller (sampling or teacher-forced log-probs); the full forward after the selection is the snapshot gather."""

    def __init__(self):
        self.ms, self.stack = {}, []  # stack: [piece, ms it last (re)started at] of the running ones, innermost last

    def _charge(self):  # adds the time since the innermost running piece (re)started to it; -> now (ms)
        now = clock()
        if self.stack:
            name, since = self.stack[-1]
            self.ms[name] = self.ms.get(name, 0.0) + now - since
        return now

    def _wrap(self, name, fn, then=None):
        def run(*args, **kwargs):
            if name == "forward" and kwargs.get("state") is not None:
                return fn(*args, **kwargs)  # a decoding step: part of its caller
            self.stack.append([name, self._charge()])  # the enclosing piece pauses
            try:
                return fn(*args, **kwargs)
            finally:
                now = self._charge()
                self.stack.pop()
                if self.stack:  # the enclosing piece resumes (a forward goes on as `then` if given)
                    self.stack[-1] = [then if then and self.stack[-1][0] == "forward" else self.stack[-1][0], now]
        return run

    @contextmanager
    def active(self, model, opt):
        import grpo
        import rollout
        import step
        targets = [(model, "forward", "forward"), (rollout, "token_entropy", "entropy"),
                   (rollout, "select_positions", "selection", "snapshot_gather"),
                   (rollout, "sample_from_snapshots", "sampling"),
                   (rollout, "logprobs_from_snapshots", "teacher_forced_logprobs"),
                   *[(mod, fn, "rewards_and_losses") for mod, fn in
                     ((step, "compute_reward"), (step, "rollout_advantages"), (step, "zero_std_fraction"),
                      (step, "ntp_loss"), (grpo, "policy_loss"), (grpo, "ntp_loss"))],
                   (torch.Tensor, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "optimiser"),
                   (opt, "step", "optimiser"), (opt, "zero_grad", "optimiser")]
        with ExitStack() as patches:  # each attribute restored on exit (an instance's own one deleted)
            for obj, attr, name, *then in targets:
                patches.enter_context(mock.patch.object(obj, attr, self._wrap(name, getattr(obj, attr), *then)))
            yield self


PIECES = ("forward", "entropy", "selection", "snapshot_gather", "sampling", "teacher_forced_logprobs",
          "rewards_and_losses", "backward", "optimiser")


def interleaved_steps(model, batch, kinds, repeat, warmup, tag, answers=None):
    """Time train_step for each kind {name: (cfg, use_refine)} on batch [B, T+1] (answers [B, T]: the synthetic data's
    answer targets, or None), each with its own AdamW, the kinds
    interleaved (the order reversed every other round, after `warmup` untimed rounds) so that drifts of a shared
    machine hit all alike; reports `<kind>_step_ms (tag)` and `<kind>_<piece>_ms` lines. A kind out of GPU memory is
    reported and left out. -> {name: medians of step_ms, each of PIECES and `other` (the step minus its pieces), with
    tokens_per_s and peak_mem_gib}"""
    from step import make_optimizer, train_step
    model.train()
    opts = {name: make_optimizer(model, cfg) for name, (cfg, _) in kinds.items()}
    samples, peak = {name: [] for name in kinds}, dict.fromkeys(kinds, 0.0 if batch.is_cuda else None)
    for r in range(warmup + repeat):
        for name in (list(opts) if r % 2 == 0 else list(opts)[::-1]):  # a kind out of memory is gone from opts
            cfg, refine = kinds[name]
            pieces = StepPieces()
            if batch.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                with pieces.active(model, opts[name]):
                    start = clock()
                    train_step(model, opts[name], batch, cfg, 0, 0, 1, refine, answers=answers)
                    total = clock() - start
            except torch.cuda.OutOfMemoryError:
                report(f"{name}_step", "out of memory")
                del opts[name]
                torch.cuda.empty_cache()
                continue
            if r >= warmup:
                samples[name].append(dict(pieces.ms, step_ms=total, other=total - sum(pieces.ms.values())))
                if batch.is_cuda:
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2 ** 30)
    tokens, results = batch.shape[0] * (batch.shape[1] - 1), {}
    for name in opts:
        r = {key: statistics.median(s.get(key, 0.0) for s in samples[name]) for key in ("step_ms", *PIECES, "other")}
        results[name] = dict(r, tokens_per_s=tokens / (r["step_ms"] / 1e3), peak_mem_gib=peak[name])
        report(f"{name}_step_ms ({tag})", r["step_ms"])
        for piece in (*PIECES, "other"):
            if r[piece] or piece == "other":
                report(f"{name}_{piece}_ms", r[piece])
    return results


def bench_refine():
    """NTP vs REFINE steps (snapshot rollouts, and once the official reforward) at two shapes: the toy DeltaNet at
    B=2, T=2048 (long sequences, few rollout tokens) and the toy preset's own REFINE phase (its model, config and
    first data batch: B=16, T=256), with train.py's allocator setting; the first shape also for the toy Gated
    DeltaNet (toy-gdn)."""
    from config import TrainConfig, parse_args
    from model import build_model
    from step import make_optimizer, train_step
    from train import keep_freed_memory, load_data, load_model
    keep_freed_memory()
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    report("machine", f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU capability "  # timings hang on it
                      f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
                      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    cfg = TrainConfig(n_chunks=8, rollout_len=5, n_rollouts=1, batch_size=2, seq_len=2048, eos_id=-1, lr=1e-4)
    for prefix, name in (("", "toy-deltanet"), ("gdn_", "toy-gdn")):   # the same shape for DeltaNet and Gated DeltaNet
        torch.manual_seed(0)
        model = build_model(name)
        batch = torch.randint(0, 256, (2, 2049))
        kinds = {f"{prefix}ntp": (cfg, False), f"{prefix}refine_snapshot": (cfg, True)}
        results = interleaved_steps(model, batch, kinds, 9, 2, f"{name}, B=2, T=2048, c=8, k=5, n=1; medians of 9 "
                                    f"interleaved steps after 2 warm-up steps each")
        opt = make_optimizer(model, cfg)
        refw = timeit(lambda: train_step(model, opt, batch, replace(cfg, rollout_mode="reforward"), 0, 0, 1, True),
                      repeat=2)
        snap = results[f"{prefix}refine_snapshot"]["step_ms"]
        report(f"{prefix}refine_reforward_step_ms (the official per-prefix re-runs; median of 2 after 1 warm-up)", refw)
        report(f"{prefix}snapshot_over_ntp", snap / results[f"{prefix}ntp"]["step_ms"])
        report(f"{prefix}reforward_over_snapshot", refw / snap)
    toy = parse_args(["--preset", "toy", "--device=cpu"])
    model, tok = load_model(toy, torch.device("cpu"))
    toy = replace(toy, eos_id=tok.eos_id)
    batch, answers = load_data(toy, tok, toy.seq_len).get_batch(toy.batch_size, with_mask=True)
    results = interleaved_steps(model, batch, {"toy_ntp": (toy, False), "toy_refine_snapshot": (toy, True)}, 9, 2,
                                f"the toy preset's REFINE phase: {toy.model}, B={toy.batch_size}, T={toy.seq_len}, "
                                f"c={toy.n_chunks}, k={toy.rollout_len}, n={toy.n_rollouts}; medians of 9 interleaved "
                                f"steps after 2 warm-up steps each", answers[:, 1:])
    report("toy_snapshot_over_ntp", results["toy_refine_snapshot"]["step_ms"] / results["toy_ntp"]["step_ms"])


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


def run_kernel_tests(pytest_args=(), interpret=False):
    """pytest tests/test_triton_kernel.py in a fresh process (compiled on CUDA, or in Triton's interpreter);
    reports its summary. -> passed"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels where CUDA is
    env.update({"TRITON_INTERPRET": "1"} if interpret else {})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_kernel.py", *pytest_args]
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, env=env, capture_output=True, text=True)
    report("kernel_tests", (run.stdout.strip().splitlines() or ["no output"])[-1].strip("= "))
    if run.returncode != 0:
        print(run.stdout[-3000:] + run.stderr[-2000:], file=sys.stderr)
    return run.returncode == 0


def bench_gpu(dry_run=False, out_dir=None, ruler=None):
    """Everything that needs a GPU, in one run (under 10 minutes on an H100-class card), step by step:
    1. the compiled kernel tests (tests/test_triton_kernel.py: forward, backward, snapshots, the gated rule);
    2. kernel_timings at B=4 T=8192 H=16 K=V=128 bf16, and at Gated DeltaNet-1.3B's heads (H=6, K=256, V=512);
    3. NTP and REFINE steps of DeltaNet-1.3B, Gated DeltaNet-1.3B and LaCT-760M on one 16K-token sequence;
    4. train.py itself: 2 steps of deltanet-1.3b-mid (random init, built-in data, 4K tokens), then --resume to step 3;
       then evaluate.py --task ruler on `ruler` (a RULER parquet file; skipped, with the reason, without one).
    dry_run: the same steps on the CPU at tiny shapes (toy models, Triton in the interpreter), so that the GPU run
    can only fail on what only a GPU shows. out_dir: gpu.log and gpu.json (every `name: value` line so far),
    rewritten after each step, so that a run cut short keeps what it measured. A failing step is reported and the
    others still run. -> the names of the failed steps"""
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import, where this process makes it
    from triton import __version__ as triton_version  # requirements.txt has it; the kernels need it on CUDA
    device = "cpu" if dry_run else "cuda"
    start, failed, tee = time.perf_counter(), [], Tee(sys.stdout)
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

        def kernel_tests():
            if not run_kernel_tests(["-k", "single_token or (gated and edges and strong)"] if dry_run else [],
                                    interpret=dry_run):
                raise RuntimeError("kernel tests failed (see above)")

        def train_and_resume():
            for n, extra in ((2, []), (3, ["--resume"])):
                run_script("train.py", *train, f"--out_dir={ckpt}", f"--max_steps={n}", *extra)

        def ruler_qa():
            if ruler is None:
                return report("ruler", "skipped: no --ruler=FILE given")
            run_script("evaluate.py", "--ckpt", str(ckpt), "--task", "ruler", "--data", ruler, "--limit",
                       "2" if dry_run else "20", "--device", device)

        steps = {"kernel_tests": kernel_tests,
                 "kernel_timings": lambda: [kernel_timings(*shape, dtype, device, repeat=1 if dry_run else 5)
                                            for shape, dtype in shapes],
                 "train_steps": lambda: [bench_train_steps(toy if dry_run else name, 64 if dry_run else 16384, device,
                                                           repeat=1 if dry_run else 2, prefix=prefix)
                                         for name, toy, prefix in models],
                 "train_and_resume": train_and_resume, "ruler": ruler_qa}
        with redirect_stdout(tee):
            for name, step in steps.items():
                try:
                    step()
                except Exception as err:  # noqa: BLE001  the others still run; the error is the step's result
                    report(f"{name}_failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    failed.append(name)
                if out_dir:
                    write_run(Path(out_dir), "gpu", "".join(tee.parts))
            report("gpu_bench_total_s", time.perf_counter() - start)
    if out_dir:
        write_run(Path(out_dir), "gpu", "".join(tee.parts))
    return failed


def run_script(script, *args):
    """python script args in a fresh process from the repository root; its exit status and its last `step` line
    (else its last line) are reported, and a non-zero exit raises with its last line."""
    run = subprocess.run([sys.executable, script, *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                         text=True)
    lines = run.stdout.strip().splitlines() or run.stderr.strip().splitlines() or ["no output"]
    last = next((line for line in lines[::-1] if line.startswith("step ")), lines[-1]) if not run.returncode \
        else (run.stderr.strip().splitlines() or lines)[-1]
    report(f"{Path(script).stem}_{'_'.join(a.lstrip('-') for a in args if a in ('--resume', 'ruler'))}".strip("_"),
           f"exit {run.returncode}: {last}")
    if run.returncode:
        print(run.stderr[-2000:], file=sys.stderr)
        raise RuntimeError(f"{script} exited {run.returncode}: {last}")


def write_run(out, name, text):
    """out/<name>.log (everything printed) and out/<name>.json (its `name: value` lines as a dict), each written to
    a temporary file first and renamed: a killed run leaves the previous complete pair."""
    import json
    out.mkdir(parents=True, exist_ok=True)
    values = {m[1]: m[3] for m in map(LINE.match, text.splitlines()) if m}
    for suffix, content in (("log", text), ("json", json.dumps(values, indent=1))):
        tmp = out / f".{name}.{suffix}.tmp"
        tmp.write_text(content)
        tmp.replace(out / f"{name}.{suffix}")


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


# ----------------------------------------------------------------------------------------------- --readme

TARGETS = {"recurrent_over_chunked": ">= 20", "gated_recurrent_over_chunked": ">= 20",
           "decode_growth_deltanet": "<= 1.25", "decode_growth_gdn": "<= 1.25", "decode_growth_lact": "<= 1.25",
           "lact_recompute_over_incremental": ">= 20", "snapshot_over_ntp": "<= 1.25",
           "toy_snapshot_over_ntp": "<= 1.3", "reforward_over_snapshot": ">= 4",
           "gdn_snapshot_over_ntp": "<= 1.25", "gdn_reforward_over_snapshot": ">= 4"}   # the README's ratio targets
LINE = re.compile(r"^([A-Za-z0-9_]+)(?: \((.*)\))?: (.*)$")   # report()'s `name (what): value`


class Tee:
    """sys.stdout that also keeps what is written (bench.py --readme)."""

    def __init__(self, out):
        self.out, self.parts = out, []

    def write(self, text):
        self.parts.append(text)
        return self.out.write(text)

    def flush(self):
        self.out.flush()


def readme_table(run):
    """The README's Benchmarks block from one run's stored output (results/bench.json: command, date, lines): the
    machine line, then a row per numeric `name: value` line; the pieces of a `<kind>_step_ms` line (its
    `<kind>_<piece>_ms` lines) go into that row's description."""
    rows = [m.groups() for m in map(LINE.match, run["lines"]) if m]       # (name, what or None, value)
    values = {name: value for name, _, value in rows}
    kinds = [name.removesuffix("step_ms") for name in values if name.endswith("_step_ms")]   # "ntp_", ...
    folded = {f"{kind}{piece}_ms" for kind in kinds for piece in (*PIECES, "other")}
    machine = values.get("machine", "no machine line (bench.py refine prints it)")
    out = [f"`{run['command']}` on {run['date']}: {machine}.", "", "| `bench.py` line | value | target |",
           "|---|---|---|"]
    for name, what, value in rows:
        if not _number(value) or name in folded:
            continue
        about = [what] if what else []
        kind = name.removesuffix("step_ms")
        parts = [f"{piece.replace('_', ' ')} {float(values[f'{kind}{piece}_ms']):.0f}" for piece in (*PIECES, "other")
                 if name.endswith("_step_ms") and f"{kind}{piece}_ms" in values]
        about += [", ".join(parts) + " ms"] if parts else []
        out.append(f"| `{name}`" + (f" ({'; '.join(about)})" if about else "") + f" | {float(value):.4g} | "
                   f"{TARGETS.get(name, '')} |")
    out += [""] + [f"`{name}`: {value}." for name, _, value in rows if name != "machine" and not _number(value)]
    return "\n".join(out).strip() + "\n"


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_readme(argv, lines, path=Path(__file__).resolve().parent):
    """--readme: store the run's `name: value` lines in results/bench.json and rewrite the README's Benchmarks table
    between <!-- benchmarks:start --> and <!-- benchmarks:end --> from it."""
    import json
    from datetime import datetime, timezone

    from study.report import update_readme
    run = dict(command=" ".join(["python bench.py", *argv]), date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
               lines=[line for line in lines if LINE.match(line)])
    (path / "results").mkdir(exist_ok=True)
    (path / "results" / "bench.json").write_text(json.dumps(run, indent=1))
    if not update_readme(path / "README.md", readme_table(run), "benchmarks"):
        fail(f"bench.py --readme: error: no <!-- benchmarks:start --> / end lines in {path / 'README.md'}", 1)


def main(argv):
    jobs = {"kernel": bench_kernel, "decode": bench_decode, "refine": bench_refine, "gpu": bench_gpu,
            "compile": bench_compile}
    options = {a.partition("=")[0]: a.partition("=")[2] for a in argv if a.startswith("--") and a not in ("--help",)}
    for key in options:
        if key not in ("--readme", "--dry-run", "--out", "--ruler"):
            fail(f"bench.py: error: unknown option {key}; the options are --readme, and with gpu --dry-run, --out=DIR "
                 f"and --ruler=FILE (--help)", 2)
    readme = "--readme" in options   # also write results/bench.json and the README's Benchmarks table from this run
    dry_run = "--dry-run" in options
    which = [a for a in argv if not a.startswith("--") or a == "--help"] or ["all"]
    if "-h" in which or "--help" in which:
        print(__doc__.strip())
        return
    for name in which:
        if name not in (*jobs, "all"):
            fail(f"bench.py: error: unknown benchmark {name!r}; choose kernel, decode, refine, all, gpu or compile "
                 f"(--help lists them)", 2)
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
