"""bench.py --readme: the README's Benchmarks table written from one run's stored lines (results/bench.json), and
that the README's block is what it writes from the stored file."""
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
