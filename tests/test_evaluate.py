"""Evaluation: batched greedy generation against a naive full-forward loop, NIAH / RULER-QA / LongBench plumbing,
validation loss against F.cross_entropy, test-time training resets, and the command line."""
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import config
import data
import evaluate
from model import FastWeightLM, ModelConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOK = data.get_tokenizer("word")   # vocab_size 504 -> models use 512
TINY = {
    "deltanet": dict(arch="deltanet", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8),
    # LaCT: window 6 and chunk 5 so the prompts cross chunk boundaries and go beyond the window
    "lact": dict(arch="lact", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attn_heads=2,
                 num_lact_heads=2, window_size=6, lact_chunk_size=5, w0_w2_low_rank=4, rope_theta=100.0),
}


def tiny(arch="deltanet", seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return FastWeightLM(ModelConfig(**{**TINY[arch], **kw})).to(dtype)


def prompts(lengths=(5, 13, 23), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def naive_greedy(model, prompt, max_new_tokens, eos_id=None):
    """The obviously-correct reference: re-run the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        tok = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        if tok == eos_id:
            break
        ids.append(tok)
    return ids[len(prompt):]

# ----------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_batched_greedy_equals_unbatched_and_naive(arch):
    model, ps = tiny(arch), prompts()
    batched = evaluate.generate(model, ps, 8)
    for p, out in zip(ps, batched):
        assert len(out) == 8                                          # no EOS given: exactly max_new_tokens
        assert out == evaluate.generate(model, [p], 8)[0]
        assert out == naive_greedy(model, p, 8)


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_eos_stops_a_row(arch):
    model, ps = tiny(arch), prompts()
    full = evaluate.generate(model, ps, 8)
    eos = full[0][3]                                                  # row 0 meets "EOS" at its 4th token at latest
    out = evaluate.generate(model, ps, 8, eos_id=eos)
    for f, o, p in zip(full, out, ps):
        assert o == (f[:f.index(eos)] if eos in f else f)
        assert o == naive_greedy(model, p, 8, eos_id=eos)
    assert len(out[0]) <= 3


def test_max_new_tokens_and_training_mode():
    model, ps = tiny(), prompts()
    model.train()
    assert evaluate.generate(model, ps, 0) == [[], [], []]
    assert [len(o) for o in evaluate.generate(model, ps, 3)] == [3, 3, 3]
    assert model.training                                             # restored after generation
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.generate(model, [[1, 2], []], 3)


def test_sampling_is_seeded():
    model, ps = tiny(), prompts()
    a = evaluate.generate(model, ps, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = evaluate.generate(model, ps, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b and [len(o) for o in a] == [6, 6, 6]


def test_generate_all_keeps_order_and_per_prompt_limits():
    model, ps = tiny(), prompts((7, 20, 3, 11))
    out = evaluate.generate_all(model, ps, [2, 5, 4, 1], batch_size=3)
    assert out == [evaluate.generate(model, [p], n)[0] for p, n in zip(ps, [2, 5, 4, 1])]


def test_encode_prompt_cuts_the_middle():
    tok = data.get_tokenizer("byte")
    assert evaluate.encode_prompt(tok, "abcdefghij") == [256] + list(b"abcdefghij")
    assert evaluate.encode_prompt(tok, "abcdefghij", 7) == [256] + list(b"abchij")   # BOS + 3 head + 3 tail
    assert evaluate.encode_prompt(tok, "abcdefghij", 6) == [256] + list(b"abhij")    # odd split: tail gets more


def test_decode_drops_ids_beyond_the_tokenizer():
    assert evaluate.decode(data.get_tokenizer("byte"), [104, 300, 105, 258, 511]) == "hi<|pad|>"   # 258 < 259: special

# ----------------------------------------------------------------------------------------------- NIAH, validation


def test_eval_niah_runs_and_scores_in_unit_interval():
    model = tiny(dtype=torch.float32, bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
    res = evaluate.eval_niah(model, TOK, lengths=(64, 80), n_examples=3, batch_size=2)
    assert list(res) == [f"{v}@{n}" for v in ("S", "MK", "MQ", "MV") for n in (64, 80)]
    assert all(0.0 <= s <= 1.0 for s in res.values())
    table = evaluate.format_table(res)
    assert table.splitlines()[0] == "| variant | 64 | 80 | avg |" and len(table.splitlines()) == 6


def test_niah_oracle_scores_one(monkeypatch):
    """An oracle that answers with the reference continuation scores 1.0 through eval_niah's own scoring path;
    an empty answer scores 0."""
    targets = {}
    for v in data.VARIANTS:
        for ex in evaluate.niah_examples(TOK, v, 64, n_examples=4):
            targets[tuple(ex["prompt_ids"])] = ex["target_ids"]
            assert evaluate.score_niah([""], [ex]) == 0.0
    monkeypatch.setattr(evaluate, "generate_all", lambda model, ps, *a, **k: [targets[tuple(p)] for p in ps])
    res = evaluate.eval_niah(None, TOK, lengths=(64,), n_examples=4)
    assert res == {f"{v}@64": 1.0 for v in data.VARIANTS}
    assert evaluate.format_table(res).splitlines()[2] == "| S | 100.0 | 100.0 |"


def test_eval_validation_matches_cross_entropy():
    model = tiny()
    g = torch.Generator().manual_seed(5)
    b1, b2 = torch.randint(0, 512, (2, 9), generator=g), torch.randint(0, 512, (3, 6), generator=g)
    res = evaluate.eval_validation(model, [b1])
    logits = model(b1[:, :-1]).logits
    # float64 model: the same cross-entropy summed in another order, ~1e-15 on O(1) values; atol 1e-12
    torch.testing.assert_close(res["loss"], F.cross_entropy(logits.flatten(0, 1), b1[:, 1:].flatten()).item(),
                               atol=1e-12, rtol=0)
    assert res["acc"] == (logits.argmax(-1) == b1[:, 1:]).float().mean().item()
    # token-weighted over batches: 16 + 15 tokens, not the mean of the two batch means
    both = evaluate.eval_validation(model, [b1, b2])
    l2 = F.cross_entropy(model(b2[:, :-1]).logits.flatten(0, 1), b2[:, 1:].flatten(), reduction="sum").item()
    l1 = res["loss"] * 16
    # float64: token-weighted mean of two batches in another order: ~1e-15; atol 1e-12
    torch.testing.assert_close(both["loss"], (l1 + l2) / 31, atol=1e-12, rtol=0)

# ----------------------------------------------------------------------------------------------- test-time training


def ttt_cfg(**kw):
    return config.TrainConfig(**{**dict(
        n_chunks=2, rollout_len=3, n_rollouts=2, select_mode="entropy", select_temperature=1.0, margin=2,
        sample_temperature=1.0, top_p=1.0, top_k=0, eos_id=TOK.eos_id, reward="binary", lambda_rl=0.4,
        lambda_sft=1.0, clip_low=0.2, clip_high=0.2, clip_c=3.0, loss_agg="token-mean", kl_coef=0.0,
        group_by="sequence", adv_scale="group", grad_clip=1.0), **kw})


def ttt_setup():
    model = tiny(dtype=torch.float32, bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:]).backward()   # one warm-up step: Adam state is not empty
    opt.step()
    opt.zero_grad()
    examples = [data.make_niah_example(data.eval_rng(7, i), "S", 40, TOK) for i in range(2)]
    return model, opt, examples


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    """Parameters and AdamW state (exp_avg, exp_avg_sq, step) bit-identical."""
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    sa, sb = a[1]["state"], b[1]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])
    assert a[1]["param_groups"] == b[1]["param_groups"]


def test_ttt_reset_restores_model_and_optimizer():
    model, opt, examples = ttt_setup()
    before = snapshot(model, opt)
    base = [evaluate.decode(TOK, evaluate.generate(model, [ex["prompt_ids"]], 4, TOK.eos_id)[0]) for ex in examples]
    res = evaluate.ttt_evaluate(model, opt, examples, ttt_cfg(), steps=2, tokenizer=TOK, max_new_tokens=4,
                                score_fn=data.niah_score, generator=torch.Generator().manual_seed(0))
    assert_same(snapshot(model, opt), before)
    assert res["n"] == 2 and 0 <= res["base"] <= 1 and 0 <= res["adapted"] <= 1
    # nothing leaked into example 2: its unadapted answer is the original model's
    assert [e["base_prediction"] for e in res["per_example"]] == base
    assert res["base"] == sum(data.niah_score(p, ex["answers"]) for p, ex in zip(base, examples)) / 2


def test_ttt_without_reset_keeps_the_adaptation():
    model, opt, examples = ttt_setup()
    before = snapshot(model, opt)
    res = evaluate.ttt_evaluate(model, opt, examples, ttt_cfg(), steps=2, tokenizer=TOK, max_new_tokens=4,
                                score_fn=data.niah_score, reset=False, generator=torch.Generator().manual_seed(0))
    after = snapshot(model, opt)
    assert not all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert after[1]["state"][0]["step"].item() == before[1]["state"][0]["step"].item() + 4   # 2 examples x 2 steps
    assert set(res["per_example"][0]) == {"base", "adapted", "base_prediction", "adapted_prediction"}


def test_ttt_rejects_a_too_short_prompt():
    model, opt, _ = ttt_setup()
    with pytest.raises(ValueError, match="too short"):
        evaluate.ttt_adapt(model, opt, [TOK.bos_id, 5, 6, 7], ttt_cfg(), steps=1)

# ----------------------------------------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_help_and_missing_checkpoint(tmp_path):
    r = run_cli("--help")
    assert r.returncode == 0 and all(w in r.stdout for w in ("niah", "ruler", "longbench"))
    r = run_cli("--ckpt", str(tmp_path / "nope"), "--task", "niah")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no checkpoint" in r.stderr


def test_cli_bad_task_and_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", str(tmp_path), "--task", "mmlu"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert evaluate.main(["--ckpt", str(tmp_path), "--task", "ruler"]) == 2
    assert evaluate.main(["--ckpt", str(tmp_path), "--task", "ruler", "--data", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evaluate.py: error: --task ruler needs --data",
                   f"evaluate.py: error: data path '{tmp_path / 'x.parquet'}' does not exist"]


def test_cli_niah_end_to_end(tmp_path, monkeypatch, capsys):
    """out_dir/hf layout, tokenizer named in config.json, table printed and JSON written (checkpoint I/O faked)."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"tokenizer": "word"}))
    model = tiny(dtype=torch.float32)
    fake = types.SimpleNamespace(load_pretrained=lambda path, dtype=None, device=None: model,
                                 load_tokenizer=lambda path: pytest.fail("no tokenizer.json here"))
    monkeypatch.setitem(sys.modules, "checkpoint", fake)
    out = tmp_path / "r.json"
    rc = evaluate.main(["--ckpt", str(tmp_path), "--task", "niah", "--variants", "S,MV", "--lengths", "64",
                        "--n", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and "| S |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["ckpt"] == str(tmp_path / "hf") and set(saved["results"]) == {"S@64", "MV@64"}

# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared evaluation data (RULER / LongBench parquet) is absent")
def test_ruler_and_longbench_on_real_rows():
    tok = data.get_tokenizer("byte")
    model = tiny(dtype=torch.float32, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    ruler = evaluate.eval_ruler_qa(model, tok, DATA / "ruler" / "ruler_squadqa_lact_4096_200_test.parquet",
                                   max_new_tokens=8, limit=2, max_prompt_tokens=256)
    assert ruler["n"] == 2 and 0 <= ruler["score"] <= 1 and len(ruler["predictions"]) == 2
    lb = evaluate.eval_longbench(model, tok, [DATA / "longbench" / "trec_16384.parquet"], limit=1,
                                 max_prompt_tokens=256)
    assert set(lb) == {"trec", "average"} and 0 <= lb["trec"] <= 1 and lb["average"] == lb["trec"]
