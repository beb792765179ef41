"""The CPU benchmarks: the delta rule (loop vs chunked; Triton and fla on CUDA), decoding at 4K vs 16K context, and
NTP vs REFINE steps piece by piece (StepPieces) at two shapes."""
import os
import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from unittest import mock

import torch

from benchmarks.common import clock, delta_inputs, fwd_bwd, log_decay, machine_line, report, side_by_side, timeit
from kernels import delta_rule, resolve_backend


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
    os.environ.setdefault("FLA_FLASH_QLA", "0")  # fla's own Triton kernels, not its optional TileLang backend
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
        report(f"triton_with_snapshots_over_fla_fwd_bwd (Triton with {n_snapshots} snapshots per sequence over fla "
               f"without)", times["triton", "snap"] / times["fla", "fwd_bwd"])
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
    report("machine", machine_line())  # what the timings hang on
    cfg = TrainConfig(n_chunks=8, rollout_len=5, n_rollouts=1, batch_size=2, seq_len=2048, eos_id=-1, lr=1e-4)
    for prefix, name in (("", "toy-deltanet"), ("gdn_", "toy-gdn")):   # the same shape for DeltaNet and Gated DeltaNet
        torch.manual_seed(0)
        model = build_model(name)
        batch = torch.randint(0, 256, (2, 2049))
        kinds = {f"{prefix}ntp": (cfg, False), f"{prefix}refine_snapshot": (cfg, True)}
        results = interleaved_steps(model, batch, kinds, 15, 2, f"{name}, B=2, T=2048, c=8, k=5, n=1; medians of 15 "
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
    results = interleaved_steps(model, batch, {"toy_ntp": (toy, False), "toy_refine_snapshot": (toy, True)}, 15, 2,
                                f"the toy preset's REFINE phase: {toy.model}, B={toy.batch_size}, T={toy.seq_len}, "
                                f"c={toy.n_chunks}, k={toy.rollout_len}, n={toy.n_rollouts}; medians of 15 interleaved "
                                f"steps after 2 warm-up steps each", answers[:, 1:])
    refine, ntp = results["toy_refine_snapshot"], results["toy_ntp"]
    report("toy_snapshot_over_ntp", refine["step_ms"] / ntp["step_ms"])
    report("toy_snapshot_over_ntp_without_decoding (the same medians with the sampling and the teacher-forced forward "
           "taken out: what no faster decoding can go below)",
           (refine["step_ms"] - refine["sampling"] - refine["teacher_forced_logprobs"]) / ntp["step_ms"])
    rows = toy.batch_size * toy.n_chunks * toy.n_rollouts   # the rollouts the sampling decodes side by side

    @torch.no_grad()
    def decoding(n):  # -> 10 one-token steps of n rows from one state, as the sampling runs them
        state, ids = model.prefill(torch.randint(0, 256, (n, 64)))[1], torch.randint(0, 256, (n, 1))
        return lambda: [model(ids, state=state) for _ in range(10)]
    wide, narrow, _ = side_by_side(decoding(rows), decoding(8), rounds=9, fast_repeat=1)
    report(f"toy_decode_step_ms_{rows}_rows (one sampling step of {toy.model}; medians of 9 alternating rounds of 10 "
           f"steps at {rows} and at 8 rows)", wide / 10)
    report("toy_decode_step_ms_8_rows (the per-operation cost: the same operations on 8 rows)", narrow / 10)
