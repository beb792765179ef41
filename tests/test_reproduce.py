"""reproduce.py: the statistics it reports, and a smoke run of every stage with tiny sizes (one process)."""
import json
import math

import pytest

import reproduce


def test_summary_is_mean_and_standard_error():
    s = reproduce.summary([1.0, 0.0, 1.0, 0.0])
    assert s["n"] == 4 and s["mean"] == 0.5
    assert s["se"] == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-12)  # sample sd sqrt(1/3), over sqrt(4)


def test_verdict_pairs_runs_by_seed():
    def run(*cells):  # a run whose NIAH cells have these means and no prompt noise
        return {"niah": {f"S@{i}": {"mean": c, "se": 0.0, "n": 100} for i, c in enumerate(cells)}}
    res = {"seeds": [0, 1, 2],
           "runs": {"sft-s0": run(0.2, 0.4), "sft-s1": run(0.5, 0.5), "sft-s2": run(0.1, 0.1),
                    "refine-s0": run(0.3, 0.5), "refine-s1": run(0.6, 0.6), "refine-s2": run(0.2, 0.2)}}
    v = reproduce.verdict(res)
    assert v["diffs"] == pytest.approx([10.0, 10.0, 10.0], abs=1e-9)  # +10 points in every pair
    assert v["sd"] == pytest.approx(0.0, abs=1e-9) and v["word"] == "better than"
    res["runs"]["refine-s2"] = run(0.0, 0.0)                            # -10 points: no longer consistent
    assert reproduce.verdict(res)["word"] == "not distinguishable from"


def test_quick_run_writes_results_and_reuses_the_base(tmp_path):
    args = ["--quick", "--jobs=1", f"--out_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]
    assert reproduce.main(args) == 0
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(res["runs"]) == {"sft-s0", "refine-s0"}
    assert set(res["base_eval"]["niah"]) == {f"{v}@{n}" for v in reproduce.VARIANTS for n in (64, 128)}
    assert all(c["n"] == 3 for c in res["runs"]["sft-s0"]["niah"].values())
    assert res["curves"]["refine-s0"]["step"] == [1, 2, 3] and res["curves"]["refine-s0"]["reward"][0] is not None
    assert res["curves"]["sft-s0"]["reward"] == [None] * 3                    # SFT has no rollouts
    assert len(res["ttt"]["refine"]["per_variant"]["MV"]["adapted"]) == 1
    md = (tmp_path / "results" / "results.md").read_text()
    assert "| MK@128 |" in md and "## 6. Verdict" in md and "python reproduce.py --quick" in md
    # the same command again: the base and both runs are reused, not retrained
    assert reproduce.main(args) == 0
    again = json.loads((tmp_path / "results" / "results.json").read_text())
    assert again["base"]["reused"] and again["runs"]["sft-s0"]["niah"] == res["runs"]["sft-s0"]["niah"]


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- toy-results:start -->\nold\n<!-- toy-results:end -->\noutro\n")
    reproduce.update_readme(readme, "# Title\n\n## 1. Base\n\n![curves](curves.png)\n")
    assert readme.read_text() == ("intro\n<!-- toy-results:start -->\n#### 1. Base\n\n![curves](results/curves.png)\n"
                                  "<!-- toy-results:end -->\noutro\n")
