"""train.py: presets, help, phases, exact resume, one-line errors on bad input (data parallel: test_distributed.py)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import step
from model import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--seq_len=32", "--batch_size=4", "--n_chunks=2", "--rollout_len=3", "--margin=2", "--warmup_steps=1",
        "--warmup_seq_len=32", "--warmup_batch_size=4", "--eval_examples=2", "--eval_lengths=64", "--eval_batches=1",
        "--lr_warmup=0", "--n_needles=1"]


def run(*args, env=None):
    """train.py in a subprocess: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       env={"OMP_NUM_THREADS": "1", **os.environ, **(env or {})})   # 1 thread unless the user sets it
    return p.returncode, p.stdout, p.stderr


def losses(out_dir):
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [(r["step"], r["ntp_loss"], r["nsp_loss"]) for r in rows if "step" in r]


def phases(out_dir):
    return [json.loads(line).get("phase") for line in open(out_dir / "metrics.jsonl") if '"step"' in line]


def test_every_preset_is_made_of_real_fields_and_builds_its_model():
    for name, (about, overrides) in config.PRESETS.items():
        cfg = config.TrainConfig(**overrides)  # a TypeError here would name an unknown key
        assert about and set(overrides) <= set(vars(cfg))
        if cfg.tokenizer != "checkpoint":
            config.validate(cfg)
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert model.num_parameters() > 0


@pytest.mark.parametrize("preset", ["toy", "toy-lact", "toy-sft", "toy-gdn"])
def test_toy_presets_dry_run(preset, tmp_path):
    code, out, err = run("--preset", preset, f"--out_dir={tmp_path}", "--max_steps=2", *TINY)  # + 1 warm-up step
    assert code == 0, err
    assert "step     3/3" in out and "validation: loss" in out
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "hf" / "config.json").exists()
    rows = losses(tmp_path)
    assert len(rows) == 3 and all(r[1] > 0 for r in rows)
    objective = "sft" if preset == "toy-sft" else "refine"
    assert phases(tmp_path) == ["warmup", objective, objective]
    assert "step     1/3 warmup" in out and f"step     3/3 {objective}" in out


def test_short_run_example_does_refine_steps(tmp_path):
    """train.py's docstring example `--preset toy --max_steps=50 --lambda_rl=0.5` (here 2 steps after a 3-step
    warm-up): max_steps counts REFINE steps, the warm-up comes on top, and the REFINE steps use lambda_rl."""
    code, out, err = run("--preset", "toy", f"--out_dir={tmp_path}", *TINY, "--warmup_steps=3", "--max_steps=2",
                         "--lambda_rl=0.5")
    assert code == 0, err
    assert phases(tmp_path) == ["warmup"] * 3 + ["refine"] * 2
    assert "3 warm-up + 2 refine" in out
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"step"' in line]
    assert all(r["nsp_loss"] == 0.0 and r["adv_logp"] is None and r["reward_mean"] is None for r in rows[:3])
    # REFINE steps: rewards, and A.logp (the surrogate's value -mean(A) is 0 up to float noise: not compared)
    assert all(r["reward_mean"] is not None and r["adv_logp"] != 0.0 for r in rows[3:])
    assert any("refine |" in line and "A·logp" in line for line in out.splitlines())


def test_help_lists_every_field_with_default_and_meaning():
    code, out, err = run("--help")
    assert code == 0 and not err
    assert all(name in out for name in config.PRESETS) and "python train.py --preset toy" in out
    for f in dataclasses.fields(config.TrainConfig):
        line = next((l for l in out.splitlines() if l.strip().startswith(f"--{f.name}=")), None)
        assert line is not None, f.name
        default, meaning = line.strip().split(None, 1)[0], line.strip().split(None, 1)[1:]
        assert default == f"--{f.name}={f.default}" and meaning and meaning[0].strip(), line
    assert run("-h")[1] == out


def test_resume_is_exact(tmp_path):
    """2 warm-up steps + checkpoint, --resume into 1 REFINE step + checkpoint, --resume to 3 REFINE steps == the
    straight run (losses of every step and the weights, bit for bit): resume across the warm-up boundary and
    inside REFINE. A constant lr: a cosine schedule depends on the run's length, which differs by design."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--preset", "toy", "--lr_schedule=constant", *TINY, "--warmup_steps=2"]
    assert run(*args, f"--out_dir={a}", "--max_steps=3")[0] == 0
    assert run(*args, f"--out_dir={b}", "--max_steps=0")[0] == 0
    assert phases(b) == ["warmup", "warmup"]
    for steps in (1, 3):
        code, _, err = run(*args, f"--out_dir={b}", f"--max_steps={steps}", "--resume")
        assert code == 0, err
    assert phases(a) == phases(b) == ["warmup"] * 2 + ["refine"] * 3
    assert losses(a) == losses(b)
    # steps 3..5 were REFINE steps (their surrogate value is 0 on-policy: the rewards show it)
    last = [json.loads(line) for line in open(a / "metrics.jsonl") if '"step"' in line][-1]
    assert last["phase"] == "refine" and last["reward_mean"] is not None
    sa, sb = (torch.load(d / "ckpt.pt", weights_only=False)["model"] for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("args,message", [
    (["--preset", "gpt5"], "unknown preset 'gpt5'; choose one of toy"),
    (["--preset", "toy", "--colour=red"], "unknown config key 'colour'; valid keys: out_dir"),
    (["--preset", "toy", "--max_steps=ten"], "--max_steps='ten' is not a valid int"),
    (["--preset", "toy", "--n_chunks=0"], "--n_chunks must be a positive integer"),
    (["--preset", "toy", "--warmup_steps=0", "--max_steps=0"], "not both 0"),
    (["--preset", "toy", "--phase=pretrain"], "--phase=pretrain trains with next-token prediction only"),
    (["--preset", "toy", "--parallel=zero"], "choose one of ddp, fsdp"),
    (["--preset", "toy", "--rollout_len=300"], "--rollout_len=300 does not fit"),
    (["--preset", "toy", "--reward=bleu"], "choose one of cosine, binary, hybrid"),
    (["--preset", "toy", "--phase=post", "--reward_encoder=frozen"], "--reward_encoder=frozen works in --phase=mid"),
    (["--preset", "toy", "--answer_weight=1", "--data=/nonexistent/file.txt"], "/nonexistent/file.txt"),
    (["--preset", "toy", "--answer_weight=1", "--select_mode=answer", "--data=x.txt"], "need --data=synthetic"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    code, out, err = run(*args, f"--out_dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_short_data_file_and_bad_checkpoints(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run("--preset", "toy", f"--data={short}", f"--out_dir={tmp_path / 'x'}", "--tokenizer=byte",
                       "--answer_weight=1")
    assert code == 2 and "Traceback" not in err and "need at least" in err, err

    run_dir = tmp_path / "run"
    assert run("--preset", "toy", f"--out_dir={run_dir}", "--max_steps=1", *TINY)[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, _, err = run("--preset", "toy", f"--out_dir={run_dir}", "--max_steps=2", *TINY)  # no --resume
    assert code == 2 and "--resume" in err
    code, _, err = run("--preset", "toy-lact", f"--out_dir={run_dir}", "--max_steps=2", "--resume", *TINY)
    assert code == 2 and "incompatible" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing overwritten

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint")
    code, _, err = run("--preset", "toy", f"--out_dir={bad}", "--resume", *TINY)
    assert code == 2 and "corrupt" in err and "Traceback" not in err, err
    assert (bad / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_non_finite_losses_skip_then_stop(tmp_path):
    """A learning rate of 1e30 makes the weights overflow after step 1: three skipped steps, exit 3, and the
    checkpoint of step 1 is left intact."""
    code, out, err = run("--preset", "toy", f"--out_dir={tmp_path}", "--max_steps=6", "--ckpt_interval=1",
                         *TINY, "--lr=1e30", "--lr_schedule=constant", "--warmup_steps=6", "--eval_examples=0")
    assert code == 3, (out, err)
    assert out.count("step skipped") == 3
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] >= 1


def test_list_presets():
    code, out, _ = run("--list_presets")
    assert code == 0 and all(name in out for name in config.PRESETS)


PAIRS = ["--seq_len=64", "--n_chunks=2", "--rollout_len=3", "--margin=2", "--eval_examples=3", "--n_needles=1"]


def test_post_phase_nested_loop(tmp_path):
    code, out, err = run("--preset", "toy", "--phase=post", "--max_steps=2", "--batch_size=2", *PAIRS,
                         f"--out_dir={tmp_path}")
    assert code == 0, err
    assert out.count("| answer sft") == 2 and "test score after" in out
    res = json.loads((tmp_path / "post.json").read_text())
    assert set(res) == {"before", "after"} and (tmp_path / "hf" / "model.safetensors").exists()


def test_post_phase_sft_only_and_a_frozen_reward_encoder(tmp_path):
    """--objective=sft post-trains on the answers alone (no prompt step); --reward_encoder=frozen runs mid-training."""
    code, out, err = run("--preset", "toy", "--phase=post", "--objective=sft", "--max_steps=2", "--batch_size=2",
                         *PAIRS, f"--out_dir={tmp_path / 'post'}")
    assert code == 0, err
    assert out.count("| answer sft") == 2 and "prompt ntp" not in out
    code, out, err = run("--preset", "toy", *TINY, "--max_steps=2", "--reward_encoder=frozen",
                         f"--out_dir={tmp_path / 'mid'}")
    assert code == 0, err
    assert phases(tmp_path / "mid") == ["warmup", "refine", "refine"] and out.count(" reward ") == 2


def test_ttt_phase_from_a_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "qa.parquet"
    prompt = " ".join(["The cat sat on the mat."] * 12) + " Where did the cat sit? Answer:"
    pq.write_table(pa.table({"prompt": [prompt, prompt], "answer": [["mat"], ["the mat"]]}), path)
    code, out, err = run("--preset", "toy", "--phase=ttt", "--tokenizer=byte", f"--data={path}", "--reward=binary",
                         "--lambda_rl=0.4", *PAIRS, f"--out_dir={tmp_path / 'run'}")
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "ttt.json").read_text())
    assert res["n"] == 2 and 0 <= res["base"] <= 1 and 0 <= res["adapted"] <= 1


@pytest.mark.parametrize("phase", ["post", "ttt"])
def test_gated_deltanet_post_training_and_test_time_training(phase, tmp_path):
    code, out, err = run("--preset", "toy-gdn", f"--phase={phase}", "--max_steps=1", "--batch_size=2", *PAIRS,
                         f"--out_dir={tmp_path}")
    assert code == 0, err
    res = json.loads((tmp_path / f"{phase}.json").read_text())
    assert set(res) == ({"before", "after"} if phase == "post" else {"base", "adapted", "n"})
    assert phase == "ttt" or json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gated_deltanet"


@pytest.mark.parametrize("mode", ["snapshot", "reforward"])
def test_ppo_layout_matches_fused_step(mode):
    """Sampling the whole batch first and re-forwarding per update (the paper's PPO layout) gives the same rollouts,
    rewards and losses as the fused one-forward step when the weights do not move (lr 0)."""
    from model import build_model
    cfg = config.TrainConfig(**{**config.PRESETS["toy"][1], "seq_len": 48, "batch_size": 4, "micro_batch_size": 2,
                               "n_chunks": 2, "rollout_len": 3, "margin": 2, "lr": 0.0, "rollout_mode": mode})
    torch.manual_seed(0)
    model = build_model("toy-deltanet")
    opt = step.make_optimizer(model, cfg)
    batch = torch.randint(0, 256, (4, 49), generator=torch.Generator().manual_seed(0))
    fused = step.train_step(model, opt, batch, cfg, 0, 0, 1, True)
    ppo = step.train_step(model, opt, batch, config.TrainConfig(**{**vars(cfg), "ppo_mini_batch": 2,
                                                                   "ppo_epochs": 2}), 0, 0, 1, True)
    assert torch.equal(torch.cat(fused["rewards"]), torch.cat(ppo["rewards"]))
    # the same per-micro-batch NTP losses, divided by mini-batch instead of batch token counts (a power of 2
    # apart: exact) and added in another order: a few float32 roundings, ~4 U = 2.4e-7 relative; 1e-6 covers them.
    # The NSP losses are not compared: on-policy at lr 0 they are 0 up to float noise (ratio 1, centred advantages)
    assert ppo["ntp_loss"] == pytest.approx(fused["ntp_loss"], rel=1e-6)


@pytest.mark.parametrize("preset", ["toy", "toy-lact", "toy-gdn"])
def test_bf16_autocast_dry_run(preset, tmp_path):
    code, out, err = run("--preset", preset, "--dtype=bfloat16", f"--out_dir={tmp_path}", "--max_steps=3", *TINY)
    assert code == 0, err
    assert all(r[1] > 0 and r[1] == r[1] for r in losses(tmp_path))


def test_the_batchs_answer_mask_drives_answer_weight_and_answer_selection(monkeypatch):
    """The data source marks the answers (step.py knows no vocabulary): answer_weight w adds (w - 1) x their NTP
    loss, select_mode "answer" starts rollouts only right before them; a batch without a mask (files) weighs
    nothing, and "answer" selection without one is an error."""
    import data
    source = data.SyntheticData(data.get_tokenizer("word"), 64, 0, (1, 2), 2, ("S",))
    batch, answers = source.get_batch(2, with_mask=True)
    answers = answers[:, 1:]                                                     # [2, 64] of the targets
    cfg = config.TrainConfig(**{**config.PRESETS["toy"][1], "seq_len": 64, "batch_size": 2, "n_chunks": 2,
                               "rollout_len": 1, "margin": 2, "grad_clip": 1e9})   # k=1: no start clamped

    def update(weight, mask, select="entropy", refine=False):  # -> the change of the weights after one SGD step
        torch.manual_seed(0)
        model = build_model("toy-deltanet")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)                        # the update is minus the gradient
        c = dataclasses.replace(cfg, answer_weight=weight, select_mode=select)
        step.train_step(model, opt, batch, c, 0, 0, 1, refine, answers=mask)
        return torch.cat([p.detach().flatten() for p in model.parameters()]) - before

    d1, d2, d3 = update(1.0, answers), update(2.0, answers), update(3.0, answers)
    assert (d2 - d1).abs().max() > 1e-4                                          # the answers' term moves weights
    # linear in (w - 1); 1e-5 covers fp32 rounding of two summed gradients (weights and updates are O(1))
    torch.testing.assert_close(d3 - d1, 2 * (d2 - d1), rtol=0, atol=1e-5)
    assert torch.equal(update(3.0, None), d1)                                    # no mask: nothing weighed

    seen = []
    collect = step.collect_rollouts
    monkeypatch.setattr(step, "collect_rollouts", lambda *a: seen.append((a[6], collect(*a)[1])) or collect(*a))
    update(1.0, answers, "answer", refine=True)
    allowed, ro = seen[0]
    assert torch.equal(allowed, answers) and allowed.gather(1, ro.positions).all()   # only before answers
    with pytest.raises(ValueError, match="needs allowed"):
        update(1.0, None, "answer", refine=True)
