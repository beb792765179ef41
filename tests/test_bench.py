"""bench.py: the command line (--help, the GPU benchmark's refusal without CUDA), pieces of the benchmarks on toy sizes
(kernel timings, NTP/REFINE step timing, interleaved decoding), and `python bench.py gpu --dry-run`: every step of the
GPU run on the CPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cpu, gpu, readme

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_names_the_benchmarks():
    for flag in ("--help", "-h"):
        run = run_bench(flag)
        assert run.returncode == 0 and run.stderr == ""
        for name in ("kernel", "decode", "refine", "all", "gpu"):
            assert f"python bench.py {name}" in run.stdout, name


def test_unknown_benchmark_is_a_one_line_error():
    run = run_bench("fast")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "unknown benchmark 'fast'" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_without_cuda_exits_2_with_one_line():
    run = run_bench("gpu")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("bench.py gpu: error:") and "CUDA" in run.stderr


def test_kernel_timings_on_toy_sizes(capsys):
    times = cpu.kernel_timings(1, 40, 2, 16, 16, torch.float32, "cpu", backends=("torch", "recurrent"),
                                 repeat=1, n_snapshots=3)
    out = capsys.readouterr().out
    for name in ("torch", "recurrent"):
        assert times[name, "fwd"] > 0 and times[name, "fwd_bwd"] > 0 and times[name, "snap"] > 0
        assert f"cpu_{name}_fwd_bwd_with_3_snapshots_ms:" in out
    # Triton is left out here: in the full suite the interpreter flag comes after triton's first import (the
    # kernels' interpreter runs are tested in tests/test_triton_kernel.py)


def test_train_step_timing_on_a_toy_model(capsys):
    results = gpu.bench_train_steps("toy-deltanet", seq_len=48, device="cpu", repeat=1, dtype="float32",
                                      n_chunks=2, rollout_len=2, margin=2)
    out = capsys.readouterr().out
    for name in ("ntp", "refine"):
        assert results[name]["tokens_per_s"] > 0 and results[name]["peak_mem_gib"] is None
        assert f"{name}_tokens_per_s:" in out
    assert "snapshot_delta_backend: torch" in out and "refine_over_ntp_step:" in out
    # the breakdown: the real pieces of each step, measured inside it, and the rest of the step beside them
    for piece in ("forward", "entropy", "snapshot_gather", "sampling", "teacher_forced_logprobs", "backward"):
        assert results["refine"][piece] > 0 and f"refine_{piece}_ms:" in out, piece
    assert results["ntp"]["sampling"] == 0 and "ntp_sampling_ms:" not in out
    for r in results.values():  # a median of differences of sums: close to the step, not exactly it
        assert sum(r[p] for p in cpu.PIECES) <= 1.5 * r["step_ms"]


def test_decode_timing_interleaves_the_contexts():
    from model import build_model
    model = build_model("toy-deltanet").eval()
    calls = []
    step = model.step
    model.step = lambda ids, state: calls.append(int(state[0]["pos"][0])) or step(ids, state)
    ms, ratios = cpu.decode_ms_per_token(model, (8, 20), new_tokens=2, rounds=3)
    assert set(ms) == set(ratios) == {8, 20} and min(ms.values()) > 0 and ratios[8] == 1.0
    # 4 rounds (one untimed) of 2 tokens per context, the order reversed every other round
    assert calls == [8, 9, 20, 21, 20, 21, 8, 9, 8, 9, 20, 21, 20, 21, 8, 9]


def test_gpu_run_dry_runs_every_step_on_the_cpu(tmp_path):
    """`bench.py gpu --dry-run`: the GPU run's every step at tiny shapes on the CPU (the kernel tests in Triton's
    interpreter, also under the launch probe's variants, kernel timings, NTP/REFINE steps of the three model
    families, train.py and its --resume, evaluate.py on a RULER file), its figures in --out; a failing step (here a
    RULER file that does not exist) is reported, the others still run, and the exit status is 1."""
    run = run_bench("gpu", "--dry-run", f"--out={tmp_path}", f"--ruler={tmp_path / 'missing.parquet'}")
    assert run.returncode == 1 and "these steps failed: ruler" in run.stderr, run.stderr[-2000:]
    import json
    run = json.loads((tmp_path / "gpu.json").read_text())   # the run, as results/bench.json keeps one
    assert run["command"] == f"python bench.py gpu --dry-run --ruler={tmp_path / 'missing.parquet'}"
    figures = {m[1]: m[3] for m in map(readme.LINE.match, run["lines"])}
    assert run["lines"][0].startswith("device: the CPU (dry run") and run["lines"][1].startswith("versions: torch ")
    assert (tmp_path / "gpu.log").read_text().count("\n") > 20
    assert [key for key in figures if key.endswith("_failed")] == ["ruler_failed"]
    # the probe's min32 too: 16-wide heads in 32-wide tiles give the right values and gradients
    for name in ("kernel_tests_bf16", "kernel_tests_fp16_fp32", "launch_probe_min32", "launch_probe_one_stage"):
        assert "passed" in figures[name] and "failed" not in figures[name], name
    assert float(figures["cpu_triton_gated_fwd_bwd_ms"]) > 0       # the interpreter ran the gated kernels
    assert "sanitizer_memcheck" in figures and "sanitizer_racecheck" in figures   # (skipped where the tool is absent)
    steps = ("kernel_tests", "kernel_timings", "train_steps", "train_and_resume", "ruler", "kernel_tests_fp16_fp32",
             "launch_probe", "sanitizer")
    assert all(float(figures[f"{step}_s"]) >= 0 for step in steps)   # each step's seconds, the failed one's too
    for family in ("deltanet", "gdn", "lact"):
        assert float(figures[f"{family}_refine_tokens_per_s"]) > 0, family
    assert figures["train"].startswith("exit 0: step     2/2")           # train.py, then --resume to step 3
    assert figures["train_resume"].startswith("exit 0: step     3/3")
    # the README's GPU table renders from it (bench.py gpu-readme), the 1.3B targets on their rows; a dry run itself
    # is refused there, with one line and status 2
    table = readme.readme_table(run)
    assert table.startswith(f"`{run['command']}` on {run['date']}: the CPU (dry run")
    assert f"| `deltanet_refine_over_ntp_step` | {float(figures['deltanet_refine_over_ntp_step']):.4g} | <= 1.3 |" \
        in table
    refused = run_bench("gpu-readme", f"--from={tmp_path / 'gpu.json'}")
    assert refused.returncode == 2 and "is a dry run" in refused.stderr and refused.stderr.count("\n") == 1


def test_failed_kernel_tests_are_named_and_rerun_under_each_launch_probe(tmp_path, capsys):
    """The GPU run's kernel-test steps return the failed tests' node ids, and the launch probe reruns them with the
    launchers' launch_config changed as its variant says (a test that passes only under a probe shows it)."""
    target = tmp_path / "test_probe_target.py"
    target.write_text("import os\nimport torch\nfrom kernels import triton_delta\n\n\n"
                      "def test_passes():\n    pass\n\n\n"
                      "def test_passes_only_probed():\n"
                      "    blocks, opts = triton_delta.launch_config(16, 16, torch.bfloat16)\n"
                      "    want = {'min32': (32, 2), 'one_stage': (16, 1)}[os.environ['REFINE_LAUNCH_PROBE']]\n"
                      "    assert (blocks.BKF, opts['num_stages']) == want\n")
    failed = gpu.run_kernel_tests("plain", [str(target)], interpret=True)
    assert len(failed) == 1 and failed[0].endswith("test_probe_target.py::test_passes_only_probed")
    for variant in ("min32", "one_stage"):
        assert gpu.run_kernel_tests(f"probe_{variant}", failed, interpret=True, probe=variant) == []
    out = capsys.readouterr().out
    assert "plain: 1 failed, 1 passed" in out and "probe_min32: 1 passed" in out and "probe_one_stage: 1 passed" in out
    with pytest.raises(RuntimeError, match="pytest exited"):  # nothing ran: no failed test to name
        gpu.run_kernel_tests("missing", [str(tmp_path / "missing.py")], interpret=True)


def test_sanitizer_report_names_the_summary_and_the_first_error(tmp_path, monkeypatch, capsys):
    """sanitize(): compute-sanitizer's ERROR SUMMARY and first error as one line, its whole report in out_dir; a run
    past the timeout keeps what it printed. (A stand-in compute-sanitizer prints a report of the tool's format.)"""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nif [ \"$2\" = racecheck ]; then sleep 30; fi\n"
                    "echo '========= COMPUTE-SANITIZER'\n"
                    "echo '========= Invalid __shared__ read of size 16 bytes'\n"
                    "echo '=========     at chunk_state_pass_kernel+0x1a0'\n"
                    "echo '========= ERROR SUMMARY: 3 errors'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    gpu.sanitize("tests/test_triton_kernel.py::test_single_token_by_hand", "memcheck", tmp_path / "out")
    gpu.sanitize("tests/test_triton_kernel.py::test_single_token_by_hand", "racecheck", tmp_path / "out", timeout=1)
    out = capsys.readouterr().out
    assert "sanitizer_memcheck: ERROR SUMMARY: 3 errors; Invalid __shared__ read of size 16 bytes\n" in out
    assert "chunk_state_pass_kernel" in (tmp_path / "out" / "sanitizer_memcheck.log").read_text()
    assert "sanitizer_racecheck: timed out after 1 s; no error\n" in out
