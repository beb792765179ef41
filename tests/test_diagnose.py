"""study/diagnose.py: the token categories of synthetic documents, the variance share, the reward-curve summary."""
import json

import pytest
import torch

import data
from study import diagnose

WORD = data.get_tokenizer("word")


def test_token_categories_of_a_hand_made_document():
    v1, v2 = data.VALUES[:2]
    text = (f" The red dog sees the cat . The code for alpha is {v1} {v2} . The cat near the dog was red ."
            f" What is the code for alpha ? {v1} {v2} .")
    cats = diagnose.token_categories(torch.tensor([WORD.encode(text)]), WORD)[0].tolist()
    assert len(cats) == len(text.split())                                               # one token per word
    expect = (["filler"] * 7 + ["needle"] * 3 + ["random", "needle", "random", "random", "needle"] +
              ["filler"] * 8 + ["query"] * 7 + ["answer", "answer", "query"])
    assert [diagnose.SHORT[c] for c in cats] == expect


def test_token_categories_match_the_answer_mask_on_generated_documents():
    batch, mask = data.SyntheticData(WORD, 256, 3, (1, 4), 2, ("S", "MQ", "MV")).get_batch(8, with_mask=True)
    cats = diagnose.token_categories(batch, WORD)                                        # [8, 257]
    assert torch.equal(cats == 1, mask)                                                 # answers = the data's mask
    values = torch.tensor([WORD.encode(" " + v)[-1] for v in data.VALUES])
    random_values = (cats == 0) & torch.isin(batch, values)
    assert int(random_values.sum()) == int(mask.sum())                                  # one needle value each


def test_explained_variance():
    v = torch.tensor([1.0, 1.0, 3.0, 3.0])
    # ratios of sums of 4 small integers: exact up to one rounding; approx's 1e-6 relative (1e-12 absolute)
    assert diagnose.explained_variance(v, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)
    assert diagnose.explained_variance(v, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    assert diagnose.explained_variance(torch.ones(3), torch.tensor([0, 1, 2])) == 0.0


def test_reward_curve_first_and_last_window(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"config": {}}] + [{"step": i + 1, "reward_mean": float(i), "reward_std": 1.0, "zero_std_frac": 0.0}
                               for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = diagnose.reward_curve(path, window=3)
    # means of 3 small numbers in float64: one rounding; approx's defaults
    assert c["steps"] == 10 and c["first"] == pytest.approx(1.0) and c["last"] == pytest.approx(8.0)
    assert diagnose.reward_curve(tmp_path / "missing.jsonl") is None
