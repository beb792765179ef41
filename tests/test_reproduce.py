"""study/reproduce.py and study/report.py: the statistics reported, and a smoke run of every stage with tiny sizes
(one process), the figures and the README summary included."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

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
    # the prompt standard error no longer enters: the seeds' t interval alone (the old main rule said "not
    # distinguishable" for +10 points on every seed whenever the prompts' SE exceeded 5 points)
    noisy = {name: {"niah": {k: dict(c, se=0.2) for k, c in r["niah"].items()}} for name, r in res["runs"].items()}
    noisy["refine-s2"] = run(0.2, 0.2)
    assert report.verdict(dict(res, runs=noisy))["word"] == "better than"


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
    assert "## 8. The REFINE signal" in md and "## 10. A second toy" in md
    # every run's train.py flags name its paths relative to --out_dir: the same on every machine
    for r in list(res["runs"].values()) + [res["base"], res["long_base"]]:
        assert not any(str(tmp_path) in a for a in r["signature"]["argv"])
    assert "--out_dir=toy-deltanet-refine-s0" in res["runs"]["refine-s0"]["signature"]["argv"]
    assert "--init_from=base-toy-deltanet/hf" in res["long_base"]["signature"]["argv"]
    # again with --ablations: the bases and the runs above are reused, not retrained; only the ablations run
    assert reproduce.main(args + ["--ablations"]) == 0
    again = json.loads((tmp_path / "results" / "results.json").read_text())
    assert again["base"]["reused"] and again["runs"]["sft-s0"]["niah"] == res["runs"]["sft-s0"]["niah"]
    assert set(again["reused"]) == set(res["runs"])
    assert {"refine-uniform-s0", "refine-answer-s0", "refine-binary-s0", "refine-k3-s0", "refine-c4-s0"} <= \
        set(again["runs"])
    assert {"refine-mb4-s0", "sft-mb4-s0", "post-refine-s0", "post-lambda0-s0", "post-sft-s0",
            "refine-only-frozen-s0"} <= set(again["runs"])
    assert set(again["ablations"]) == {"refine-binary-s0", "refine-k3-s0", "refine-c4-s0"}
    assert "--reward_encoder=frozen" in again["runs"]["refine-only-frozen-s0"]["signature"]["argv"]
    assert again["reward_curves"]["refine-only-frozen-s0"]["steps"] == 3
    assert set(again["runs"]["post-sft-s0"]["niah"]) == set(res["base_eval"]["niah"])
    md = (tmp_path / "results" / "results.md").read_text()
    assert "## 7. Ablations" in md and "## 9. Selection" in md and "| answer |" in md
    assert "## 11. Post-training" in md and "## 12. Optimiser steps" in md and "## 13. REFINE-only with a frozen" in md
    assert "| nested REFINE − nested, lambda_RL 0, mean [95% interval] |" in md
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
    assert "- post-training: nested REFINE is **not distinguishable from** the same nested loop with lambda_RL 0" \
        in summary                                                         # one seed: no interval, no verdict


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
    seeds = [int(s) for s in args.seeds.split(",")]
    assert seeds == [0, 1, 2, 3, 4]
    runs = {f"{obj}-s{s}": (obj, s, (), "main") for obj in ("refine", "sft") for s in seeds}
    runs.update({f"{name}-s0": ("refine", 0, tuple(extra), "main") for name, extra in reproduce.ABLATIONS.items()})
    runs.update(experiments.extra_runs(args, seeds))
    assert {"refine-mb4-s4", "sft-mb4-s4", "post-sft-s4", "post-lambda0-s4", "long-refine-s4",
            "refine-only-frozen-s0", "refine-uniform-s2"} <= set(runs)
    assert "refine-uniform-s3" not in runs                                  # selection: the first 3 seeds
    cfgs = {}
    for name, (obj, seed, extra, toy) in runs.items():
        data_args = reproduce.DATA if toy == "main" else experiments.LONG_DATA
        cfgs[name] = config.parse_args(reproduce.mid_argv(args, Path("base"), Path("run"), obj, seed, extra,
                                                          data_args))
        assert cfgs[name].objective == obj and cfgs[name].seed == seed, name
    # post-training: the control differs from nested REFINE in lambda_RL alone (same steps, pairs and tokens)
    ref, ctl, sft = cfgs["post-refine-s1"], cfgs["post-lambda0-s1"], cfgs["post-sft-s1"]
    assert (ref.phase, ref.lambda_rl, ctl.lambda_rl, sft.objective) == ("post", 0.2, 0.0, "sft")
    assert ctl == dataclasses.replace(ref, lambda_rl=0.0) and sft == dataclasses.replace(ref, objective="sft")


def test_readme_block_is_what_the_report_writes():
    """The README's toy results are readme_summary of the stored results/results.json (python -m study.reproduce
    --report rewrites them)."""
    root = Path(reproduce.__file__).resolve().parents[1]
    res = json.loads((root / "results" / "results.json").read_text())
    assert report.readme_block(root / "README.md", "toy-results") == report.readme_summary(res).strip()
    assert "/work/" not in json.dumps([r["signature"]["argv"] for r in res["runs"].values()])


def test_post_training_control_takes_the_same_steps_on_the_same_tokens():
    """Section 11's control (nested loop, lambda_RL 0): per batch a prompt step that is plain NTP on the prompts, then
    the answer step; the same train_step calls on the same token ids as nested REFINE (lambda_RL 0.2)."""
    import copy

    import config
    import data
    import phases
    import step
    from model import build_model
    tok = data.get_tokenizer("word")
    flags = ["--preset=toy", "--phase=post", "--objective=refine", "--seq_len=64", "--batch_size=4", "--max_steps=2",
             "--eval_examples=1", "--n_chunks=4", "--rollout_len=3", "--margin=4", "--value_tokens=2",
             "--model=toy-deltanet", "--reward=hybrid"]
    torch.manual_seed(0)
    start = build_model("toy-deltanet")

    def post(lambda_rl, plain_prompt_step=False):   # -> (model after post_train, [(ids, use_refine, answer step)])
        cfg = dataclasses.replace(config.parse_args(flags + [f"--lambda_rl={lambda_rl}"]), eos_id=tok.eos_id)
        model, calls = copy.deepcopy(start), []

        def recorded(model, opt, ids, cfg, s, rank, world, use_refine, **kw):
            calls.append((ids.clone(), use_refine, kw.get("target_mask") is not None))
            out = step.train_step(model, opt, ids, cfg, s, rank, world, use_refine and not plain_prompt_step, **kw)
            return dict(out, rewards=[torch.zeros(1)]) if use_refine and plain_prompt_step else out
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(phases, "train_step", recorded)
            phases.post_train(cfg, model, step.make_optimizer(model, cfg), tok, torch.device("cpu"))
        return model, calls
    control, calls = post(0.0)
    _, refine_calls = post(0.2)
    assert [(u, a) for _, u, a in calls] == [(True, False), (False, True)] * 2      # prompt step, then answer step
    assert [(u, a) for _, u, a in refine_calls] == [(u, a) for _, u, a in calls]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(calls, refine_calls))      # the same tokens
    explicit, _ = post(0.0, plain_prompt_step=True)                                 # NTP on prompts, then SFT
    # the rollout forward (with snapshots) and a plain forward round differently: 8e-8 measured after these 4 AdamW
    # steps at lr 2e-3; a skipped or differently weighted prompt step moves weights by ~lr, 2000x more than 1e-6
    for p, q in zip(control.parameters(), explicit.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
