"""Tests for metrics.py: hand-computed scores for every metric and preprocessing branch, then checks on the real
evaluation data in <repo>/../shared/data (skipped when that folder is absent)."""
import itertools
import sys
from pathlib import Path

import pytest

from metrics import (
    LONGBENCH_MAX_NEW_TOKENS, LONGBENCH_METRIC, TREC_CLASSES, classification_score, code_sim_score,
    longbench_score, normalize_answer, qa_f1_score, rouge_l_score, ruler_qa_score,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOL = 1e-7  # rouge adds 1e-8 to a denominator; everything else is exact up to float rounding


# ------------------------------------------------------------------------------------------------ RULER QA


def test_ruler_substring_case_insensitive_max_over_answers():
    assert ruler_qa_score("It was Frank Lowy, I think.", ["frank lowy"]) == 1.0
    assert ruler_qa_score("Denver Broncos", ["Carolina Panthers", "broncos"]) == 1.0  # max over references
    assert ruler_qa_score("Denver Broncos", ["Carolina Panthers", "Patriots"]) == 0.0
    assert ruler_qa_score("ÉCOLE Normale", ["école"]) == 1.0  # unicode lower-casing
    assert ruler_qa_score("Lowy", ["Frank Lowy"]) == 0.0  # the prediction in the answer does not count


def test_ruler_first_line_and_cleaning():
    assert ruler_qa_score("  Frank Lowy  \n", ["Frank Lowy"]) == 1.0
    assert ruler_qa_score("I do not know\nFrank Lowy", ["Frank Lowy"]) == 0.0  # only the first line counts
    assert ruler_qa_score("I do not know\nFrank Lowy", ["Frank Lowy"], mode="ruler") == 1.0
    # REFINE cuts before stripping: a leading newline leaves an empty first line
    assert ruler_qa_score("\nFrank Lowy", ["Frank Lowy"]) == 0.0
    assert ruler_qa_score("\nFrank Lowy", ["Frank Lowy"], mode="ruler") == 1.0
    # control characters become newlines, so a tab breaks a multi-word match
    assert ruler_qa_score("Frank\tLowy", ["Frank Lowy"]) == 0.0
    assert ruler_qa_score("Frank\tLowy", ["Frank"]) == 1.0
    assert ruler_qa_score("", ["Frank Lowy"]) == 0.0
    assert ruler_qa_score("\n\n", ["Frank Lowy"], mode="ruler") == 0.0


def test_ruler_bad_input():
    with pytest.raises(ValueError, match="single str"):
        ruler_qa_score("Paris", "Paris")
    with pytest.raises(ValueError, match="non-empty"):
        ruler_qa_score("Paris", [])
    with pytest.raises(ValueError, match="mode"):
        ruler_qa_score("Paris", ["Paris"], mode="nvidia")
    with pytest.raises(ValueError, match="prediction"):
        ruler_qa_score(None, ["Paris"])


# ------------------------------------------------------------------------------------------------ QA F1


def test_normalize_answer():
    assert normalize_answer("The Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer("Théâtre  de\tl'Odéon\n") == "théâtre de lodéon"
    assert normalize_answer("«Paris» – A-B") == "«paris» – ab"  # only ASCII punctuation is removed
    assert normalize_answer("") == ""


def test_qa_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    # float64 ratios of small counts: one or two roundings of 1.1e-16; abs 1e-12
    assert qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7, abs=1e-12)
    # counts are clipped: one shared "paris", P = 1/3, R = 1, F1 = 1/2
    assert qa_f1_score("Paris paris PARIS", "Paris") == pytest.approx(0.5, abs=1e-12)
    assert qa_f1_score("Zürich!", "zürich") == 1.0
    assert qa_f1_score("", "Paris") == 0.0
    assert qa_f1_score("the", "the") == 0.0  # both normalise to no tokens
    assert qa_f1_score("London", "Paris") == 0.0


# ------------------------------------------------------------------------------------------------ ROUGE-L


def test_rouge_l_hand_computed():
    # LCS("a b c", "a x c d") = 2; P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l_score("a b c", "a x c d") == pytest.approx(4 / 7, abs=TOL)
    assert rouge_l_score("hello world", "world hello") == pytest.approx(0.5, abs=TOL)
    assert rouge_l_score("The cat sat.", "The cat sat.") == pytest.approx(1.0, abs=TOL)


def test_rouge_l_empty_inputs_score_zero():
    assert rouge_l_score("", "a summary") == 0.0
    assert rouge_l_score("a summary", "") == 0.0
    assert rouge_l_score("", "") == 0.0
    assert rouge_l_score("...", "a summary") == 0.0  # only full stops: no sentence left
    assert rouge_l_score("   ", "a summary") == 0.0


def test_rouge_l_recursion_overflow_scores_zero_like_longbench():
    # The rouge package backtracks its LCS recursively; > 1000 words in one sentence overflows the stack and
    # LongBench's bare except turns that into 0, though the true score is > 0 (a 50-word version: F = 2/26).
    assert rouge_l_score(" ".join(f"w{i}" for i in range(50)), "w0 w1") == pytest.approx(2 / 26, abs=TOL)
    assert rouge_l_score(" ".join(f"w{i}" for i in range(1100)), "w0 w1") == 0.0


# ------------------------------------------------------------------------------------------------ classification


def _longbench_classification_literal(prediction, ground_truth, all_classes):
    """LongBench's loop as described in its metrics.py: remove from the list being iterated."""
    em = [c for c in all_classes if c in prediction]
    for term in em:
        if term in ground_truth and term != ground_truth:
            em.remove(term)
    return 1.0 / len(em) if ground_truth in em else 0.0


def test_classification_trec_rules():
    assert classification_score("Other location", "Other location") == 1.0
    assert classification_score("City or Country", "City") == 0.5  # two classes matched, one right
    assert classification_score("Country", "City") == 0.0
    assert classification_score("Building", "City") == 0.0  # nothing matched: 0 (no fuzzy fallback)
    assert classification_score("", "City") == 0.0
    assert classification_score("city", "City") == 0.0  # case-sensitive
    assert classification_score("United States", "State") == 1.0  # a class inside a longer word still matches


def test_classification_substring_of_ground_truth_is_dropped():
    classes = ("location", "Other location")
    assert classification_score("Other location", "Other location", classes) == 1.0  # "location" dropped
    assert classification_score("Other location", "location", classes) == 0.5  # truth itself is never dropped
    # LongBench's in-place removal skips the match after a dropped one: "Other" is dropped, "location" escapes
    # the check, "Other location" is kept -> 2 matches, score 1/2 (1.0 without the quirk)
    assert classification_score("Other location", "Other location", ("Other", "location", "Other location")) == 0.5


def test_classification_matches_longbench_loop_for_every_class_order():
    names = ["Other", "location", "Other location", "City", "Cit"]
    preds = ["Other location", "Other location City", "City", "location Cit", "Other"]
    for order in itertools.permutations(names):
        for pred in preds:
            for truth in ("Other location", "City", "location"):
                want = _longbench_classification_literal(pred, truth, list(order))
                assert classification_score(pred, truth, order) == want, (order, pred, truth)


def test_classification_bad_classes():
    with pytest.raises(ValueError, match="duplicate"):
        classification_score("City", "City", ["City", "City"])


def test_trec_classes_constant():
    assert len(TREC_CLASSES) == 50 and len(set(TREC_CLASSES)) == 50
    assert TREC_CLASSES[:3] == ("Food", "Date", "Order, rank") and "Lasting time of somethin" in TREC_CLASSES
    assert not [(a, b) for a in TREC_CLASSES for b in TREC_CLASSES if a != b and a in b]


# ------------------------------------------------------------------------------------------------ code similarity


def test_code_first_line_selection():
    gold = "    return x + 1"
    assert code_sim_score("```python\n# add one\n    return x + 1\n```", gold) == 1.0
    assert code_sim_score("\n\n    return x + 1\nfoo()", gold) == 1.0  # leading newlines skipped
    assert code_sim_score("x = 1  # note\n// c\n    return x + 1", gold) == 1.0  # '#', '//' lines skipped
    assert code_sim_score("# only\n// comments\n```", gold) == 0.0  # no code line: "" is compared
    assert code_sim_score("", gold) == 0.0
    assert code_sim_score("", "") == 1.0  # fuzzywuzzy: equal strings score 100 before the empty check


def test_code_fuzz_ratio_hand_computed():
    # indel distance 2 over 8 characters: 100 * 6/8 = 75
    assert code_sim_score("abcd", "abce") == 0.75
    # 100 * 4/6 = 66.67 -> 67
    assert code_sim_score("abc", "abd") == 0.67
    # fuzzywuzzy rounds with Python's round (half to even): 12.5 -> 12, 37.5 -> 38
    assert code_sim_score("a" + "b" * 7, "a" + "c" * 7) == 0.12
    assert code_sim_score("xyz" + "b" * 5, "xyz" + "c" * 5) == 0.38


# ------------------------------------------------------------------------------------------------ longbench_score


def test_longbench_tables_cover_the_14_tasks():
    assert set(LONGBENCH_METRIC) == set(LONGBENCH_MAX_NEW_TOKENS) and len(LONGBENCH_METRIC) == 14
    assert set(LONGBENCH_METRIC.values()) == {"qa_f1", "rouge_l", "classification", "code_sim"}
    assert LONGBENCH_MAX_NEW_TOKENS["gov_report"] == 512 and LONGBENCH_MAX_NEW_TOKENS["trec"] == 64
    assert LONGBENCH_MAX_NEW_TOKENS["samsum"] == 128 and LONGBENCH_MAX_NEW_TOKENS["hotpotqa"] == 32


def test_longbench_first_line_tasks():
    assert longbench_score("trec", "\n\nCity\nCountry", ["City"]) == 1.0  # uncut it would be 1/2
    assert longbench_score("triviaqa", "\nParis\nFrance", ["France", "Paris"]) == 1.0
    assert longbench_score("triviaqa", "\nParis\nFrance", ["France"]) == 0.0
    assert longbench_score("samsum", "Anna is late.\nShe is sorry.", ["Anna is late."]) == pytest.approx(1, abs=TOL)


def test_longbench_qa_modes():
    # LongBench does not cut QA answers: "paris is capital" vs "paris", P = 1/3, R = 1 -> 1/2
    assert longbench_score("hotpotqa", "Paris\nis the capital", ["Paris"]) == pytest.approx(0.5, abs=1e-12)
    assert longbench_score("hotpotqa", "Paris\nis the capital", ["Paris"], mode="refine") == 1.0
    assert longbench_score("hotpotqa", "\nParis", ["Paris"]) == 1.0
    assert longbench_score("hotpotqa", "\nParis", ["Paris"], mode="refine") == 0.0  # REFINE cuts before stripping
    assert longbench_score("qasper", "No.", ["yes", "no"]) == 1.0  # max over references


def test_longbench_rouge_modes():
    # whitespace after the last full stop is one more (empty) word: P = 3/4, R = 1 -> 6/7; REFINE strips it
    assert longbench_score("qmsum", "The cat sat. \n", ["The cat sat."]) == pytest.approx(6 / 7, abs=TOL)
    assert longbench_score("qmsum", "The cat sat. \n", ["The cat sat."], mode="refine") == pytest.approx(1, abs=TOL)


def test_longbench_code_modes():
    assert longbench_score("lcc", "# done\n", ["# done"]) == 0.0  # no code line: "" vs gold
    assert longbench_score("lcc", "# done", ["# done"], mode="refine") == 1.0  # REFINE keeps the whole text
    assert longbench_score("repobench-p", "foo(x)\nbar()", ["bar()", "foo(x)"]) == 1.0


def test_longbench_custom_classes():
    assert longbench_score("trec", "Cat", ["Cat"], all_classes=["Cat", "Dog"]) == 1.0
    assert longbench_score("trec", "Cat", ["Cat"]) == 0.0  # "Cat" is no TREC class


@pytest.mark.parametrize("task", sorted(LONGBENCH_METRIC))
@pytest.mark.parametrize("mode", ["longbench", "refine"])
def test_longbench_empty_prediction_scores_zero(task, mode):
    assert longbench_score(task, "", ["Some reference. It has words."], mode=mode) == 0.0
    assert longbench_score(task, "\n\n", ["Other location"], mode=mode) == 0.0


def test_longbench_bad_input():
    with pytest.raises(ValueError, match="valid tasks"):
        longbench_score("passage_count", "1", ["1"])
    with pytest.raises(ValueError, match="mode"):
        longbench_score("trec", "City", ["City"], mode="thudm")
    with pytest.raises(ValueError, match="single str"):
        longbench_score("hotpotqa", "Paris", "Paris")


def test_optional_dependencies_raise_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge", None)
    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)
    with pytest.raises(ImportError, match="pip install rouge rapidfuzz"):
        rouge_l_score("a", "a")
    with pytest.raises(ImportError, match="pip install rouge rapidfuzz"):
        code_sim_score("a", "b")
    assert longbench_score("hotpotqa", "Paris", ["Paris"]) == 1.0  # F1 tasks need neither


# ------------------------------------------------------------------------------------------------ real data


def _read(path, columns):
    pq = pytest.importorskip("pyarrow.parquet", reason="reading the evaluation parquet files needs pyarrow")
    return pq.read_table(path, columns=columns).to_pylist()


def _data_dir(sub):
    if not (DATA / sub).is_dir():
        pytest.skip(f"real evaluation data not found at {DATA / sub} (only present in the project workspace)")
    return DATA / sub


def test_ruler_gold_answers_score_one():
    files = sorted(_data_dir("ruler").glob("ruler_*_test.parquet"))
    for task in ("squadqa", "hotpotqa"):
        path = next(f for f in files if f.name.startswith(f"ruler_{task}_"))
        rows = _read(path, ["answer"])
        assert len(rows) == 200
        for mode in ("refine", "ruler"):
            assert all(ruler_qa_score(r["answer"][0], r["answer"], mode=mode) == 1.0 for r in rows), (path, mode)


def test_longbench_files_load_and_map_to_tables():
    files = sorted(_data_dir("longbench").glob("*_16384.parquet"))
    seen = set()
    for path in files:
        rows = _read(path, ["answers", "max_gen_tokens", "task"])
        tasks = {r["task"] for r in rows}
        assert tasks == {path.name[: -len("_16384.parquet")]}, path
        task = tasks.pop()
        assert task in LONGBENCH_METRIC and task in LONGBENCH_MAX_NEW_TOKENS
        assert {r["max_gen_tokens"] for r in rows} == {LONGBENCH_MAX_NEW_TOKENS[task]}, task
        assert all(len(r["answers"]) >= 1 for r in rows)
        seen.add(task)
    assert seen == set(LONGBENCH_METRIC)


def test_longbench_f1_gold_answers_score_one():
    root = _data_dir("longbench")
    for task in [t for t, m in LONGBENCH_METRIC.items() if m == "qa_f1"]:
        rows = _read(root / f"{task}_16384.parquet", ["answers"])
        for r in rows:
            gold = r["answers"][0]
            assert longbench_score(task, gold, r["answers"]) == 1.0, (task, gold)
            if "\n" not in gold:
                assert longbench_score(task, gold, r["answers"], mode="refine") == 1.0, (task, gold)


def test_trec_gold_and_class_list_match_the_data():
    rows = _read(_data_dir("longbench") / "trec_16384.parquet", ["prompt", "answers"])
    labels = {line[len("Type: "):] for r in rows for line in r["prompt"].split("\n") if line.startswith("Type: ")}
    assert labels == set(TREC_CLASSES)
    assert all(longbench_score("trec", r["answers"][0], r["answers"]) == 1.0 for r in rows)


def test_code_gold_answers_score_one_when_they_are_code_lines():
    root = _data_dir("longbench")
    for task in ("lcc", "repobench-p"):
        rows = _read(root / f"{task}_16384.parquet", ["answers"])
        plain = [r for r in rows if not any(s in r["answers"][0] for s in ("`", "#", "//"))]
        assert len(plain) >= 0.95 * len(rows)
        assert all(longbench_score(task, r["answers"][0], r["answers"]) == 1.0 for r in plain), task


def test_samsum_gold_answers_rouge_one():
    rows = _read(_data_dir("longbench") / "samsum_16384.parquet", ["answers"])
    for r in rows:
        assert longbench_score("samsum", r["answers"][0], r["answers"]) == pytest.approx(1.0, abs=TOL)
