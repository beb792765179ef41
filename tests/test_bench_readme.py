"""bench.py --readme: the README's Benchmarks table written from one run's stored lines (results/bench.json), and
that the README's block is what it writes from the stored file; bench.py gpu-readme likewise for the GPU table
(results/gpu.json, from the gpu.json of a `bench.py gpu` run)."""
import io
import json
from pathlib import Path

import pytest

from benchmarks import readme
from study import report

ROOT = Path(__file__).resolve().parents[1]
LINES = ["machine: a test CPU, 2 cores, torch 2.13.0+cpu CPU capability AVX512, 2 threads",
         "cpu_recurrent_fwd_bwd_ms (B=1 T=4096 H=4 K=V=64 fp32): 4405.123",
         "recurrent_over_chunked: 23.557",
         "cuda: not available: Triton timings skipped",
         "ntp_step_ms (toy DeltaNet, B=2, T=2048): 187.200",
         "ntp_forward_ms: 54.100", "ntp_backward_ms: 128.000", "ntp_other_ms: 1.100",
         "snapshot_over_ntp: 1.202"]


def test_table_from_one_run():
    table = readme.readme_table(dict(command="python bench.py all --readme", date="2026-12-04", lines=LINES))
    assert table.startswith("`python bench.py all --readme` on 2026-12-04: a test CPU, 2 cores, torch 2.13.0+cpu")
    assert "| `recurrent_over_chunked` | 23.56 | >= 20 |" in table
    assert "| `cpu_recurrent_fwd_bwd_ms` (B=1 T=4096 H=4 K=V=64 fp32) | 4405 |  |" in table
    # a step's pieces go into its row, not rows of their own
    assert "| `ntp_step_ms` (toy DeltaNet, B=2, T=2048; forward 54, backward 128, other 1 ms) | 187.2 |  |" in table
    assert "ntp_forward_ms" not in table and "`cuda`: not available: Triton timings skipped." in table


def test_write_readme_keeps_the_lines_and_rewrites_the_block(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("a\n<!-- benchmarks:start -->\nold\n<!-- benchmarks:end -->\nb\n")
    tee = readme.Tee(io.StringIO())
    print("\n".join(LINES + ["not a bench line", "kernel_tests: 3 passed"]), file=tee)
    readme.write_readme(["all", "--readme"], "".join(tee.parts).splitlines(), tmp_path)
    run = json.loads((tmp_path / "results" / "bench.json").read_text())
    assert run["command"] == "python bench.py all --readme" and "not a bench line" not in run["lines"]
    assert report.readme_block(tmp_path / "README.md", "benchmarks") == readme.readme_table(run).strip()
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(SystemExit):
        readme.write_readme(["all", "--readme"], LINES, tmp_path)


def test_readme_block_is_what_the_command_writes():
    stored = ROOT / "results" / "bench.json"
    if not stored.exists():
        pytest.skip("results/bench.json not generated yet (python bench.py all --readme, on an idle machine)")
    assert report.readme_block(ROOT / "README.md", "benchmarks") == \
        readme.readme_table(json.loads(stored.read_text())).strip()


GPU_LINES = ["device: NVIDIA H200", "versions: torch 2.11.0, triton 3.6.0, cuda 13.0",
             "kernel_tests_bf16: 52 passed in 80.00s", "triton_over_fla_fwd_bwd: 1.104",
             "deltanet_refine_step_ms (deltanet-1.3b T=16384 bfloat16 checkpointing, medians of 2): 3100.000",
             "deltanet_refine_forward_ms: 900.000", "deltanet_refine_over_ntp_step: 1.221",
             "deltanet_refine_tokens_per_s: 5285.100"]


def test_gpu_table_from_a_gpu_run(tmp_path):
    run = dict(command="python bench.py gpu --ruler=r.parquet", date="2026-12-05", lines=GPU_LINES)
    (tmp_path / "gpu.json").write_text(json.dumps(run))
    (tmp_path / "README.md").write_text(f"a\n<!-- gpu:start -->\n{readme.GPU_NONE}\n<!-- gpu:end -->\nb\n")
    readme.write_gpu_readme(tmp_path / "gpu.json", tmp_path)
    assert json.loads((tmp_path / "results" / "gpu.json").read_text()) == run
    block = report.readme_block(tmp_path / "README.md", "gpu")
    assert block == readme.readme_table(run).strip()
    assert block.startswith("`python bench.py gpu --ruler=r.parquet` on 2026-12-05: NVIDIA H200, torch 2.11.0, "
                            "triton 3.6.0, cuda 13.0.")
    assert "| `triton_over_fla_fwd_bwd` | 1.104 | <= 1.2 |" in block
    assert "| `deltanet_refine_tokens_per_s` | 5285 | >= 4000 |" in block
    assert "(deltanet-1.3b T=16384 bfloat16 checkpointing, medians of 2; forward 900 ms) | 3100 |" in block
    assert "`kernel_tests_bf16`: 52 passed in 80.00s." in block
    for bad in ("[1, 2]", "not json", json.dumps(dict(run, lines=[1, 2])),
                json.dumps(dict(run, command="python bench.py gpu --dry-run"))):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(SystemExit) as exit_:
            readme.write_gpu_readme(tmp_path / "bad.json", tmp_path)
        assert exit_.value.code == 2
    assert json.loads((tmp_path / "results" / "gpu.json").read_text()) == run   # untouched by the refusals


def test_readme_gpu_block_is_what_the_command_writes():
    """Until a GPU run comes back, the block says so; then it is the table of results/gpu.json."""
    stored = ROOT / "results" / "gpu.json"
    want = readme.readme_table(json.loads(stored.read_text())) if stored.exists() else readme.GPU_NONE
    assert report.readme_block(ROOT / "README.md", "gpu") == want.strip()
