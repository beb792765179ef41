"""study/seeds.py: the README table of a preset over seeds (and of presets side by side) from a stored JSON, the
marked block it rewrites, and that the README's block is what the command writes from results/seeds.json."""
import json
from pathlib import Path

import pytest

from study import report, seeds

ROOT = Path(__file__).resolve().parents[1]


def fixture(presets=("toy",), seed_list=(0, 1), shift=0.0):
    """A stored JSON as run_all writes it, with made-up eval.json contents (two lengths, four variants)."""
    runs = {}
    for i, p in enumerate(presets):
        for s in seed_list:
            niah = {f"niah_{v}@{n}": 0.5 + 0.1 * s + (shift * i) for v in ("S", "MK", "MQ", "MV") for n in (256, 512)}
            runs[f"{p}-s{s}"] = dict(command=f"python train.py --preset={p} --seed={s}", preset=p, seed=s,
                                     eval=dict(val_loss=1.5 - 0.01 * s, **niah), wall_s=100.0 + s, reused=False)
    return dict(command="python -m study.seeds --seeds " + ",".join(map(str, seed_list)), presets=list(presets),
                seeds=list(seed_list), jobs=2, threads=1, machine="a test CPU, 2 cores", runs=runs)


def test_one_preset_table_from_json():
    block = seeds.table(fixture())
    assert "`python -m study.seeds --seeds 0,1`: 2 runs of `train.py`, 2 at a time with 1 thread(s) each" in block
    assert "on a test CPU, 2 cores; 100-101 s per run" in block
    # seeds 0 and 1: 50 and 60 percent in every cell, mean 55, sd sqrt(50) = 7.07
    assert "| MK (one of 4 keys asked; a random one of the 4 needle values: 25%) | 55.0 ± 7.1 | 55.0 ± 7.1 |" in block
    assert "Per seed (MK@256 / NIAH average): 0: 50.0 / 50.0, 1: 60.0 / 60.0" in block
    assert "every seed within 5.0 points of the mean" in block


def test_presets_side_by_side_with_the_verdict():
    block = seeds.table(fixture(("toy", "toy-gdn"), (0, 1, 2), shift=0.02))
    assert "| toy, mean ± sd | toy-gdn, mean ± sd | toy-gdn − toy [95% interval] |" in block
    # +2 points on every seed: a zero-width interval above 0
    assert "| average | 60.0 ± 10.0 | 62.0 ± 10.0 | +2.0 [+2.0, +2.0] |" in block
    assert "toy-gdn is **better than** toy" in block and "1.4900 ± 0.0100 vs 1.4900 ± 0.0100" in block


def test_write_block_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- seeds:toy:start -->\nold\n<!-- seeds:toy:end -->\noutro\n")
    assert report.update_readme(readme, "| new |\n", "seeds:toy")
    assert readme.read_text() == "intro\n<!-- seeds:toy:start -->\n| new |\n<!-- seeds:toy:end -->\noutro\n"
    assert not report.update_readme(readme, "x", "seeds:toy,toy-gdn")          # no markers: nothing written
    assert report.readme_block(readme, "seeds:toy") == "| new |" and report.readme_block(readme, "x") is None


def test_report_mode_rewrites_the_readme_from_the_json(tmp_path):
    stored, readme = tmp_path / "s.json", tmp_path / "README.md"
    stored.write_text(json.dumps(fixture(("toy", "toy-lact"))))
    readme.write_text("a\n<!-- seeds:toy,toy-lact:start -->\n<!-- seeds:toy,toy-lact:end -->\nb\n")
    assert seeds.main(["--report", "--presets=toy,toy-lact", f"--json={stored}", f"--readme={readme}"]) == 0
    assert seeds.table(fixture(("toy", "toy-lact"))).strip() in readme.read_text()
    with pytest.raises(SystemExit, match="does not exist"):
        seeds.main(["--report", f"--json={tmp_path / 'none.json'}", f"--readme={readme}"])


@pytest.mark.parametrize("name", ["seeds.json"] + sorted(p.name for p in (ROOT / "results").glob("seeds-*.json")))
def test_readme_block_is_what_the_command_writes(name):
    stored = ROOT / "results" / name
    if not stored.exists():
        pytest.skip(f"results/{name} not generated yet (python -m study.seeds --seeds 0,1,2,3,4,1337)")
    res = json.loads(stored.read_text())
    block = report.readme_block(ROOT / "README.md", "seeds:" + ",".join(res["presets"]))
    assert block == seeds.table(res).strip()


def test_real_runs_each_with_its_log_then_reused(tmp_path):
    """Two tiny train.py runs in their own processes (4 warm-up + 2 REFINE steps, 2 prompts per cell), then the same
    command again: both reused, the same table."""
    args = ["--seeds=0,1", "--jobs=2", f"--out_dir={tmp_path / 'runs'}", f"--json={tmp_path / 's.json'}",
            f"--readme={tmp_path / 'README.md'}", "--train_flags=--warmup_steps=4 --max_steps=2 --eval_examples=2 "
            "--eval_batches=1"]
    (tmp_path / "README.md").write_text("<!-- seeds:toy:start -->\n<!-- seeds:toy:end -->\n")
    assert seeds.main(args) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["jobs"] == 2 and res["threads"] == 1 and set(res["runs"]) == {"toy-s0", "toy-s1"}
    for s in (0, 1):
        run = res["runs"][f"toy-s{s}"]
        assert f"--seed={s}" in run["command"] and not run["reused"] and set(seeds.cells(run)) == {
            f"{v}@{n}" for v in ("S", "MK", "MQ", "MV") for n in (256, 512)}
        assert "validation: loss" in (tmp_path / "runs" / f"toy-s{s}" / "train.log").read_text()
    assert "'--train_flags=--warmup_steps=4 --max_steps=2" in res["command"]       # quoted as a shell would need
    readme = (tmp_path / "README.md").read_text()
    assert seeds.main(args) == 0
    again = json.loads((tmp_path / "s.json").read_text())
    assert all(r["reused"] for r in again["runs"].values())
    assert (tmp_path / "README.md").read_text() == readme
