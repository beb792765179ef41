"""Tests for data.py: tokenizers, the synthetic NIAH corpus, file loading and batch streams (all offline, fast)."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORD, BYTE = data.get_tokenizer("word"), data.get_tokenizer("byte")
NEEDLE = re.compile(r" The code for (\w+) is ([\d ]+?) \.")


# ------------------------------------------------------------------------------------------------ tokenizers

TEXTS = ["Hello, world!\n\n  two  spaces\tand tab", "naïve café — 東京 🙂 Ωμέγα", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text):
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8"))   # one token per UTF-8 byte
    assert BYTE.decode(ids) == text


def test_byte_tokenizer_specials():
    assert (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id, BYTE.vocab_size, BYTE.name) == (256, 257, 258, 259, "byte")
    assert BYTE.decode([256, 104, 105, 257]) == "<|bos|>hi<|eos|>"
    assert BYTE.encode("<|bos|>") == list(b"<|bos|>")   # special text in data stays plain text


def test_grammar_sizes_and_distinct_words():
    sizes = [len(x) for x in (data.FUNCTION_WORDS, data.ADJECTIVES + data.NOUNS + data.VERBS, data.KEYS, data.VALUES)]
    assert sizes == [15, 44, 58, 128]
    assert len(set(data.GRAMMAR_WORDS)) == 245
    assert all(len(v) == 4 and v.isdigit() for v in data.VALUES)


def test_every_grammar_word_is_one_word_token():
    ids = [WORD.encode(" " + w) for w in data.GRAMMAR_WORDS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 245
    assert WORD.vocab_size == 256 + 245 + 3 == 504
    assert (WORD.bos_id, WORD.eos_id, WORD.pad_id) == (501, 502, 503)
    sentence = " What is the code for alpha ? " + data.VALUES[7] + " ."
    assert len(WORD.encode(sentence)) == 9


@pytest.mark.parametrize("text", ["The codex for Zeta is 12345!", "  Ünïcödé\n text 🙂", " code codes coded"])
def test_word_tokenizer_round_trips_any_text(text):
    assert WORD.decode(WORD.encode(text)) == text


def test_word_tokenizer_round_trips_synthetic_documents():
    for i in range(5):
        ids = data.make_document(data.train_rng(3, i), 200, WORD, styles=("S", "MQ", "MV"))
        assert WORD.encode(WORD.decode(ids)) == ids
        assert len(WORD.decode(ids).split()) == 200   # one token per word


def test_get_tokenizer_names_and_unknown():
    assert data.get_tokenizer("byte").name == "byte" and data.get_tokenizer("word").vocab_size == 504
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'; valid: byte, word, gpt2"):
        data.get_tokenizer("bpe")


def test_get_tokenizer_uncached_without_network(monkeypatch, tmp_path):
    import tiktoken.load
    import tiktoken.registry

    def no_network(blobpath):
        raise ConnectionError(f"blocked in tests: {blobpath}")
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})          # forget encodings loaded in this process
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))          # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)      # and no network
    with pytest.raises(ValueError, match=r"^tokenizer 'gpt2' is not cached .*use --tokenizer=byte or word$"):
        data.get_tokenizer("gpt2")


def test_hf_tokenizer_from_local_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = data.HFTokenizer(tmp_path / "tokenizer.json", bos_id=1, eos_id=2)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (5, 1, 2, 2)
    assert hf.encode("hello world moon") == [3, 4, 0]
    assert hf.decode([3, 4]) == "hello world"
    with pytest.raises(ValueError, match="bos_id=9 is outside the vocabulary"):
        data.HFTokenizer(tmp_path / "tokenizer.json", bos_id=9, eos_id=2)
    with pytest.raises(ValueError, match="does not exist; pass the path of a local tokenizer.json"):
        data.HFTokenizer(tmp_path / "missing.json", bos_id=1, eos_id=2)


# ---------------------------------------------------------------------------------------------- synthetic

def _queries(text):
    """(key, value) of every single-key query line with its answer."""
    return re.findall(r" What is the code for (\w+) \? ([\d ]+?) \.", text)


@pytest.mark.parametrize("tok,length", [(WORD, 64), (WORD, 300), (BYTE, 400)])
def test_document_length_and_needles_before_queries(tok, length):
    for i in range(10):
        ids, mask = data.make_document(data.train_rng(1, i), length, tok, n_needles=(1, 3), return_mask=True)
        assert len(ids) == len(mask) == length
        text = tok.decode(ids)
        queries, needles = _queries(text), NEEDLE.findall(text)
        assert 1 <= len(queries) <= 3 and sorted(queries) == sorted(needles)   # every needle asked, once
        first_query = text.index(" What is")
        for key, value in queries:
            assert text.index(f" The code for {key} is {value} .") < first_query
        # the mask marks exactly the answer values of the queries
        assert tok.decode([t for t, m in zip(ids, mask) if m]).split() == [v for _, v in queries]
        for m in NEEDLE.finditer(text):   # needles sit between whole sentences
            assert text[:m.start()].endswith(" .") if m.start() else text[m.end():].startswith(" The ")


def test_document_styles_mq_mv_and_multi_token_values():
    ids = data.make_document(data.train_rng(0, 0), 120, WORD, n_needles=3, styles=("MQ",), value_tokens=2)
    text = WORD.decode(ids)
    needles = dict(NEEDLE.findall(text))
    m = re.search(r" What are the codes for (\w+) and (\w+) and (\w+) \? (.+) \.$", text)
    assert len(needles) == 3 and m and set(m.groups()[:3]) == set(needles)
    assert m.group(4).split(" and ") == [needles[k] for k in m.groups()[:3]]
    assert all(len(v.split()) == 2 for v in needles.values())
    ids, mask = data.make_document(data.train_rng(0, 1), 120, WORD, n_needles=4, styles=("MV",), return_mask=True)
    text = WORD.decode(ids)
    assert WORD.decode([t for t, m in zip(ids, mask) if m]).split() == [v for _, v in NEEDLE.findall(text)]
    needles = NEEDLE.findall(text)
    assert len({k for k, _ in needles}) == 1 and len(needles) == 4
    assert text.endswith(f" What are all the codes for {needles[0][0]} ? " + " and ".join(v for _, v in needles) + " .")


def test_document_style_mk_asks_one_needle_among_distractors():
    seen = set()
    for r in range(20):
        ids, mask = data.make_document(data.train_rng(2, r), 160, WORD, n_needles=4, styles=("MK",), value_tokens=2,
                                       return_mask=True)
        text = WORD.decode(ids)
        needles = dict(NEEDLE.findall(text))
        m = re.search(r" What is the code for (\w+) \? (\w+ \w+) \.$", text)
        assert len(needles) == 4 and m and needles[m.group(1)] == m.group(2)   # 3 distractors, 1 query
        assert text.count(" What ") == 1
        assert WORD.decode([t for t, k in zip(ids, mask) if k]).split() == m.group(2).split()
        seen.add(list(needles).index(m.group(1)))
    assert len(seen) > 1   # the asked needle is not always the same one


def test_value_length_ranges():
    # an int keeps the original stream exactly; a range (lo, hi) draws each value's length from lo..hi
    assert data.value_range(2) == (2, 2) and data.value_range((3, 6)) == (3, 6)
    a = data.make_document(data.train_rng(0, 5), 120, WORD, n_needles=3, value_tokens=2)
    assert a == data.make_document(data.train_rng(0, 5), 120, WORD, n_needles=3, value_tokens=(2, 2))
    sizes = set()
    for r in range(40):
        ids, mask = data.make_document(data.train_rng(1, r), 256, WORD, n_needles=(1, 4), value_tokens=(3, 6),
                                       styles=("S", "MQ", "MV"), return_mask=True)
        text = WORD.decode(ids)
        needles = NEEDLE.findall(text)
        sizes |= {len(v.split()) for _, v in needles}
        # the mask still marks exactly the answer values (in query order), whatever their lengths
        answers = WORD.decode([t for t, m in zip(ids, mask) if m]).split()
        assert sorted(answers) == sorted(w for _, v in needles for w in v.split())
    assert sizes == {3, 4, 5, 6}
    ex = data.make_niah_example(data.eval_rng(0, 0), "MK", 256, WORD, value_tokens=(3, 6))
    assert 3 <= len(ex["answers"][0].split()) <= 6 and WORD.decode(ex["target_ids"]).split()[:-1] == \
        ex["answers"][0].split()
    with pytest.raises(ValueError, match="value_tokens"):
        data.make_document(data.train_rng(0, 0), 120, WORD, value_tokens=(4, 3))


def test_document_too_short_and_bad_style():
    with pytest.raises(ValueError, match=r"length_tokens=20 is too short for 2 needles .*needs at least 32"):
        data.make_document(data.train_rng(0, 0), 20, WORD, n_needles=2)   # 2 needles x 7 + 2 queries x 9 = 32
    with pytest.raises(ValueError, match="unknown document style 'X'; valid: S, MK, MQ, MV"):
        data.make_document(data.train_rng(0, 0), 64, WORD, styles=("X",))


@pytest.mark.parametrize("variant,n_answers,n_needles", [("S", 1, 1), ("MK", 1, 4), ("MQ", 4, 4), ("MV", 4, 4)])
def test_niah_example_structure(variant, n_answers, n_needles):
    for i in range(5):
        ex = data.make_niah_example(data.eval_rng(0, i), variant, 200, WORD)
        prompt = ex["prompt_ids"]
        assert prompt[0] == WORD.bos_id and len(prompt) - 1 + len(ex["target_ids"]) == 200
        text = WORD.decode(prompt[1:])
        assert text.endswith(" ?") and text.count(" What ") == 1 and "<|" not in text
        needles = NEEDLE.findall(text)
        assert len(needles) == n_needles and len(ex["answers"]) == n_answers
        keys = [k for k, _ in needles]
        assert len(set(keys)) == (1 if variant == "MV" else n_needles)   # MK/MQ: distinct keys (distractors)
        for a in ex["answers"]:
            key = next(k for k, v in needles if v == a)                 # each answer is some needle's value
            assert f" {key} " in text[text.index(" What "):]             # and its key is asked
        assert ex["answer_ids"] == [[WORD.encode(" " + a)[0]] for a in ex["answers"]]
        assert WORD.decode(ex["target_ids"]) == " " + " and ".join(ex["answers"]) + " ."
        assert data.niah_score(WORD.decode(ex["target_ids"]), ex["answers"]) == 1.0
    if variant == "MV":   # answers in order of appearance
        assert ex["answers"] == [v for _, v in needles]


def test_niah_mq_subset_and_errors():
    ex = data.make_niah_example(data.eval_rng(1), "MQ", 300, BYTE, n_needles=4, n_queries=2, bos=False)
    assert len(ex["answers"]) == 2 and ex["prompt_ids"][0] != BYTE.bos_id
    text = BYTE.decode(ex["prompt_ids"])
    assert len(ex["prompt_ids"]) + len(ex["target_ids"]) == 300 and len(NEEDLE.findall(text)) == 4
    assert re.search(r" What are the codes for \w+ and \w+ \?$", text)
    assert ex["answer_ids"] == [list((" " + a).encode()) for a in ex["answers"]]
    with pytest.raises(ValueError, match="n_queries=5 must be in 1..n_needles=4"):
        data.make_niah_example(data.eval_rng(1), "MQ", 150, WORD, n_queries=5)
    with pytest.raises(ValueError, match="unknown NIAH variant 'XL'; valid: S, MK, MQ, MV"):
        data.make_niah_example(data.eval_rng(1), "XL", 150, WORD)


def test_niah_score_string_match_all():
    # a ratio of counts in float64: one rounding; abs 1e-12
    assert data.niah_score(" 1234 and 5678 .", ["1234", "5678", "9999"]) == pytest.approx(2 / 3, abs=1e-12)
    assert data.niah_score("The Code is ABC", ["abc"]) == 1.0
    assert data.niah_score("", ["1"]) == 0.0
    with pytest.raises(ValueError, match="answers is empty"):
        data.niah_score("x", [])


def test_train_and_eval_streams_differ_and_are_deterministic():
    train = [data.make_document(data.train_rng(5, i), 100, WORD) for i in range(3)]
    evals = [data.make_document(data.eval_rng(5, i), 100, WORD) for i in range(3)]
    assert all(t != e for t in train for e in evals)
    assert train[0] == data.make_document(data.train_rng(5, 0), 100, WORD)
    assert train[0] != train[1]


def test_synthetic_batches_shape_bos_determinism_and_resume():
    a = data.SyntheticData(WORD, 64, seed=7)
    batches = [a.get_batch(4) for _ in range(3)]
    assert batches[0].shape == (4, 65) and batches[0].dtype == torch.long
    assert (batches[0][:, 0] == WORD.bos_id).all() and (batches[0][:, 1:] < 501).all()
    assert torch.equal(data.SyntheticData(WORD, 64, seed=7).get_batch(4), batches[0])
    assert not torch.equal(data.SyntheticData(WORD, 64, seed=8).get_batch(4), batches[0])
    b = data.SyntheticData(WORD, 64, seed=7)
    b.get_batch(4)
    state = json.loads(json.dumps(b.state_dict()))   # survives a round trip through a checkpoint
    c = data.SyntheticData(WORD, 64, seed=7)
    c.load_state_dict(state)
    assert torch.equal(c.get_batch(4), batches[1]) and torch.equal(c.get_batch(4), batches[2])
    with pytest.raises(ValueError, match="state is for seed 7"):
        data.SyntheticData(WORD, 64, seed=8).load_state_dict(state)


def test_synthetic_batch_mask_marks_answers():
    batch, mask = data.SyntheticData(WORD, 64, seed=0, n_needles=2).get_batch(3, with_mask=True)
    assert mask.shape == batch.shape and mask.dtype == torch.bool
    assert (mask.sum(1) == 2).all() and not mask[:, 0].any()
    values = {WORD.encode(" " + v)[0] for v in data.VALUES}
    assert all(int(t) in values for t in batch[mask])


def test_generator_speed_smoke():
    import time
    d = data.SyntheticData(WORD, 256, seed=0)
    t0 = time.perf_counter()
    d.get_batch(64)
    print(f"64 x 256 word batch: {time.perf_counter() - t0:.3f} s")   # informative only, no wall-clock limit


# ------------------------------------------------------------------------------------------------------ files

def _write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path)


def test_each_format_loads(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nstill the first doc\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n', encoding="utf-8")
    _write_parquet(tmp_path / "c.parquet", text=["fourth", "", "fifth"])
    _write_parquet(tmp_path / "d.parquet", prompt=["Q1 Answer:", "Q2\n"], answer=[["A1", "B1"], ["A2"]])
    assert data.load_documents(tmp_path / "a.txt") == ["first doc\n\nstill the first doc\n"]   # one document
    assert data.load_documents(tmp_path / "b.jsonl") == ["second", "third"]
    assert data.load_documents(tmp_path / "c.parquet") == ["fourth", "fifth"]                  # empty dropped
    assert data.load_documents(tmp_path / "d.parquet") == ["Q1 Answer: A1", "Q2\nA2"]          # first answer
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text("sixth", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert data.load_documents(tmp_path) == ["first doc\n\nstill the first doc\n", "second", "third", "fourth",
                                             "fifth", "Q1 Answer: A1", "Q2\nA2", "sixth"]


def test_load_prompt_answer_formats(tmp_path):
    _write_parquet(tmp_path / "qa.parquet", prompt=["p1", "p2"], answer=[["a", "b"], ["c"]])
    (tmp_path / "qa.jsonl").write_text('{"prompt": "p3", "answers": "d"}\n', encoding="utf-8")
    assert data.load_prompt_answer(tmp_path / "qa.parquet") == [dict(prompt="p1", answers=["a", "b"]),
                                                               dict(prompt="p2", answers=["c"])]
    assert data.load_prompt_answer(tmp_path / "qa.jsonl") == [dict(prompt="p3", answers=["d"])]
    _write_parquet(tmp_path / "bad.parquet", prompt=["p"])
    with pytest.raises(ValueError, match="has no 'prompt' and 'answer'/'answers' fields"):
        data.load_prompt_answer(tmp_path / "bad.parquet")


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass a .txt, .jsonl or .parquet file or a folder"):
        data.load_documents(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x.csv' \(extension '.csv'\); valid: .txt, .jsonl, .parquet or a folder"):
        data.load_documents(tmp_path / "x.csv")
    _write_parquet(tmp_path / "y.parquet", body=["no text here"])
    with pytest.raises(ValueError, match="has no 'text' or 'prompt' column \\(columns: body\\)"):
        data.load_documents(tmp_path / "y.parquet")
    (tmp_path / "z.jsonl").write_text('{"text": "ok"}\n{"body": "bad"}\n')
    with pytest.raises(ValueError, match="z.jsonl line 2 has no 'text' field"):
        data.load_documents(tmp_path / "z.jsonl")
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="j.jsonl line 2 is not valid JSON"):
        data.load_documents(tmp_path / "j.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no data files; valid extensions: .txt, .jsonl, .parquet"):
        data.load_documents(tmp_path / "empty")
    (tmp_path / "t.txt").write_text("hello")   # BOS + 5 bytes + EOS = 7 tokens
    with pytest.raises(ValueError, match=re.escape(f"data file {tmp_path / 't.txt'} has 7 tokens; "
                                                   f"need at least seq_len+1 = 9")):
        data.TextData(tmp_path / "t.txt", BYTE, seq_len=8, seed=0)


def test_text_data_packing_wraparound_and_resume(tmp_path):
    docs = ["abcdefghij", "klmnopq", "rstuvwxyz0", "123"]   # 10+7+10+3 bytes + 2 specials each = 38 tokens
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    td = data.TextData(tmp_path / "d.jsonl", BYTE, seq_len=8, seed=0)
    assert (td.n_tokens, td.windows_per_epoch) == (38, 4)   # 38 // 9 windows; 2 leftover tokens dropped
    batches = [td.get_batch(3) for _ in range(4)]           # 12 rows: three epochs
    assert batches[0].shape == (3, 9) and batches[0].dtype == torch.long
    assert td.epoch == 2 and td.window == 4
    offsets = []
    for e in range(3):   # each epoch's windows tile its stream: a shuffle of the documents, offset <= 2
        rows = torch.cat(batches)[4 * e:4 * e + 4].flatten().tolist()
        stream = np.concatenate([td.docs[i] for i in np.random.default_rng([data._TEXT_SALT, 0, e]).permutation(4)])
        offsets += [s for s in range(3) if stream[s:s + 36].tolist() == rows]
    assert len(offsets) == 3 and set(offsets) != {0}   # a seeded offset, so the dropped tokens vary by epoch
    assert BYTE.bos_id in batches[0] and BYTE.eos_id in batches[0]
    resumed = data.TextData(tmp_path / "d.jsonl", BYTE, seq_len=8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps({"seed": 0, "epoch": 1, "window": 2})))  # after 6 rows
    assert torch.equal(resumed.get_batch(6), torch.cat(batches[2:]))
    other = data.TextData(tmp_path / "d.jsonl", BYTE, seq_len=8, seed=1).get_batch(12)
    assert not torch.equal(other, torch.cat(batches))


# ------------------------------------------------------------------------------------------------ real data

def test_real_ruler_parquet_prompt_answer():
    path = SHARED_DATA / "ruler" / "ruler_squadqa_lact_4096_200_test.parquet"
    if not path.exists():
        pytest.skip(f"real RULER data not present at {path} (only in the project's shared workspace)")
    pairs = data.load_prompt_answer(path)
    assert len(pairs) == 200
    assert all(p["prompt"].rstrip().endswith("Answer:") for p in pairs)
    assert all(2 <= len(p["answers"]) <= 4 and all(isinstance(a, str) and a for a in p["answers"]) for p in pairs)
    docs = data.load_documents(path)
    assert len(docs) == 200 and docs[0] == pairs[0]["prompt"] + " " + pairs[0]["answers"][0]
