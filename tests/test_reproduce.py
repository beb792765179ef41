"""study/reproduce.py and study/report.py: the statistics reported, and a smoke run of every stage with tiny sizes
(one process), the figures and the README summary included."""
import json
import math
from pathlib import Path

import pytest

from study import report, reproduce


def test_summary_is_mean_and_standard_error():
    s = report.summary([1.0, 0.0, 1.0, 0.0])
    assert s["n"] == 4 and s["mean"] == 0.5
    assert s["se"] == pytest.approx(math.sqrt(1 / 3) / 2, abs=1e-12)  # sample sd sqrt(1/3), over sqrt(4)


def test_verdict_pairs_runs_by_seed():
    def run(*cells):  # a run whose NIAH cells have these means and no prompt noise
        return {"niah": {f"S@{i}": {"mean": c, "se": 0.0, "n": 100} for i, c in enumerate(cells)}}
    res = {"seeds": [0, 1, 2],
           "runs": {"sft-s0": run(0.2, 0.4), "sft-s1": run(0.5, 0.5), "sft-s2": run(0.1, 0.1),
                    "refine-s0": run(0.3, 0.5), "refine-s1": run(0.6, 0.6), "refine-s2": run(0.2, 0.2)}}
    v = report.verdict(res)
    # float64 differences of percentages (x100): ~1e-14 of rounding; abs 1e-9
    assert v["diffs"] == pytest.approx([10.0, 10.0, 10.0], abs=1e-9)  # +10 points in every pair
    assert v["sd"] == pytest.approx(0.0, abs=1e-9) and v["word"] == "better than"
    res["runs"]["refine-s2"] = run(0.0, 0.0)                            # -10 points: no longer consistent
    assert report.verdict(res)["word"] == "not distinguishable from"


def test_quick_run_writes_results_and_reuses_the_base(tmp_path):
    args = ["--quick", "--jobs=1", f"--out_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]
    assert reproduce.main(args) == 0
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(res["runs"]) == {"sft-s0", "refine-s0", "refine-only-s0", "long-sft-s0", "long-refine-s0"}
    assert set(res["base_eval"]["niah"]) == {f"{v}@{n}" for v in reproduce.VARIANTS for n in (64, 128)}
    assert all(c["n"] == 3 for c in res["runs"]["sft-s0"]["niah"].values())
    assert res["curves"]["refine-s0"]["step"] == [1, 2, 3] and res["curves"]["refine-s0"]["reward"][0] is not None
    assert res["curves"]["sft-s0"]["reward"] == [None] * 3                    # SFT has no rollouts
    assert len(res["ttt"]["refine"]["per_variant"]["MV"]["adapted"]) == 1
    # the second toy: multi-token values in its evaluation, and a teacher-forced answer accuracy
    assert set(res["runs"]["long-sft-s0"]["niah"]) == {f"{v}@128" for v in reproduce.VARIANTS}
    assert 0.0 <= res["runs"]["long-refine-s0"]["answer_acc"] <= 1.0 and "answer_acc" in res["long_base_eval"]
    assert res["runs"]["refine-only-s0"]["signature"]["argv"][-2:] == ["--lambda_rl=1.0", "--max_steps=3"]
    assert "--lambda_sft=0" in res["runs"]["refine-only-s0"]["signature"]["argv"]
    # the diagnostics: every model and selection mode, category shares that add up to one
    diag = res["diagnostics"]["base"]
    assert set(diag) == {"entropy", "uniform", "answer"}
    for mode in diag.values():
        # float64 shares of one count: a few roundings; approx's 1e-6 relative
        assert sum(c["share_selected"] for c in mode["categories"].values()) == pytest.approx(1.0)
        assert mode["grad_nsp"] > 0 and mode["grad_ntp"] > 0
    assert diag["answer"]["categories"]["random"]["share_selected"] == 0.0   # never a needle's random key/value
    assert res["reward_curves"]["refine-only-s0"]["steps"] == 3
    md = (tmp_path / "results" / "results.md").read_text()
    assert "| MK@128 |" in md and "## 6. Verdict" in md and "python -m study.reproduce --quick" in md
    assert "## 8. Why REFINE" in md and "## 10. A second toy" in md
    # again with --ablations: the bases and the runs above are reused, not retrained; only the ablations run
    assert reproduce.main(args + ["--ablations"]) == 0
    again = json.loads((tmp_path / "results" / "results.json").read_text())
    assert again["base"]["reused"] and again["runs"]["sft-s0"]["niah"] == res["runs"]["sft-s0"]["niah"]
    assert set(again["reused"]) == set(res["runs"])
    assert {"refine-uniform-s0", "refine-answer-s0", "refine-binary-s0", "refine-k3-s0", "refine-c4-s0"} <= \
        set(again["runs"])
    assert {"refine-mb4-s0", "sft-mb4-s0", "post-refine-s0", "post-sft-s0", "refine-only-frozen-s0"} <= \
        set(again["runs"])
    assert set(again["ablations"]) == {"refine-binary-s0", "refine-k3-s0", "refine-c4-s0"}
    assert "--reward_encoder=frozen" in again["runs"]["refine-only-frozen-s0"]["signature"]["argv"]
    assert again["reward_curves"]["refine-only-frozen-s0"]["steps"] == 3
    assert set(again["runs"]["post-sft-s0"]["niah"]) == set(res["base_eval"]["niah"])
    md = (tmp_path / "results" / "results.md").read_text()
    assert "## 7. Ablations" in md and "## 9. Selection" in md and "| answer |" in md
    assert "## 11. Post-training" in md and "## 12. Optimiser steps" in md and "## 13. REFINE-only with a frozen" in md
    # the figures are drawn by the command, headless; --report redraws them and rewrites results.md from results.json
    for name in ("niah.png", "curves.png"):
        png = (tmp_path / "results" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 and f"]({name})" in md   # a drawn figure
        (tmp_path / "results" / name).unlink()
    (tmp_path / "results" / "results.md").write_text("stale")
    assert reproduce.main(args + ["--report"]) == 0
    assert (tmp_path / "results" / "results.md").read_text() == md
    assert all((tmp_path / "results" / name).exists() for name in ("niah.png", "curves.png"))
    summary = report.readme_summary(again)
    assert "| average |" in summary and "![NIAH](results/niah.png)" in summary and "results/results.md" in summary


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- toy-results:start -->\nold\n<!-- toy-results:end -->\noutro\n")
    report.update_readme(readme, "| table |\n\n![NIAH](results/niah.png)\n")
    assert readme.read_text() == ("intro\n<!-- toy-results:start -->\n| table |\n\n![NIAH](results/niah.png)\n"
                                  "<!-- toy-results:end -->\noutro\n")


def test_every_run_of_the_full_study_is_a_valid_train_command():
    """At the default sizes (not --quick's): each run's train.py flags pass config validation. A PPO mini-batch of 4
    at batch 16 needs micro-batches of 4, which the quick run's batch of 4 cannot show."""
    import config
    from study import experiments
    args = reproduce.parse(["--ablations"])
    runs = {f"{obj}-s{s}": (obj, s, (), "main") for obj in ("refine", "sft") for s in (0, 1, 2)}
    runs.update({f"{name}-s0": ("refine", 0, tuple(extra), "main") for name, extra in reproduce.ABLATIONS.items()})
    runs.update(experiments.extra_runs(args, [0, 1, 2]))
    assert {"refine-mb4-s2", "sft-mb4-s2", "post-sft-s2", "refine-only-frozen-s0"} <= set(runs)
    for name, (obj, seed, extra, toy) in runs.items():
        data_args = reproduce.DATA if toy == "main" else experiments.LONG_DATA
        cfg = config.parse_args(reproduce.mid_argv(args, Path("base"), Path("run"), obj, seed, extra, data_args))
        assert cfg.objective == obj and cfg.seed == seed, name
