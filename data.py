"""Data: tokenizers, a synthetic needle-in-a-haystack corpus (RULER-style) and text files.

Tokenizers (get_tokenizer: byte, word, tiktoken; HFTokenizer) share one interface: encode(text) -> list[int],
decode(ids) -> str, vocab_size, bos_id, eos_id, pad_id, name.
Synthetic grammar (a word-level recall task a tiny model learns on a CPU; every word is written with a leading space):
  needle " The code for K is V ."      query " What is the code for K ? V ."
  MQ     " What are the codes for K1 and K2 ? V1 and V2 ."      MV " What are all the codes for K ? V1 and V2 ."
  filler: 4 sentence templates over 44 filler words. K: 58 keys; V: `value_tokens` words out of 128 numbers
  (value_tokens: an int, or a range (lo, hi) from which each value's length is drawn: multi-token answers).
Files: .txt (the whole file is ONE document), .jsonl ("text" per line), .parquet ("text" column, or "prompt" plus
an optional "answer"/"answers" column: prompt + " " + first answer), or a folder searched recursively, sorted.
"""
import functools
import json
from pathlib import Path

import numpy as np
import tiktoken
import torch

PAT_STR = r" ?\S+|\s+(?!\S)|\s+"   # a word with its leading space, or a run of whitespace

# ----------------------------------------------------------------------------------------------- tokenizers
class TiktokenTokenizer:
    """A tiktoken Encoding behind the project's tokenizer interface. Special-token text in `encode` is plain text.
    words: build a local encoding (no file, no network) of the 256 bytes (so any text encodes), then each word " w"
    as one token, then bos/eos/pad. No merges are needed: the regex cuts text into " word" pieces and tiktoken looks
    a whole piece up before running BPE; any other piece falls back to bytes."""

    def __init__(self, enc, name, bos_id=None, eos_id=None, pad_id=None, words=None):
        if words is not None:
            ranks = {bytes([i]): i for i in range(256)} | {(" " + w).encode(): 256 + i for i, w in enumerate(words)}
            bos_id, eos_id, pad_id = len(ranks), len(ranks) + 1, len(ranks) + 2
            enc = tiktoken.Encoding(f"refine_{name}", pat_str=PAT_STR, mergeable_ranks=ranks,
                                    special_tokens={"<|bos|>": bos_id, "<|eos|>": eos_id, "<|pad|>": pad_id})
        self.enc, self.name, self.vocab_size = enc, name, enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A local HuggingFace `tokenizer.json` (no hub access); the caller gives bos/eos/pad ids (pad defaults to eos)."""

    def __init__(self, path, bos_id, eos_id, pad_id=None):
        from tokenizers import Tokenizer
        if not Path(path).is_file():
            raise ValueError(f"tokenizer file '{path}' does not exist; pass the path of a local tokenizer.json")
        self.tok, self.name = Tokenizer.from_file(str(path)), f"hf:{path}"
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, eos_id if pad_id is None else pad_id
        for what, i in (("bos_id", self.bos_id), ("eos_id", self.eos_id), ("pad_id", self.pad_id)):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{what}={i} is outside the vocabulary of '{path}' (valid: 0..{self.vocab_size - 1})")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


TIKTOKEN_NAMES = ("gpt2", "cl100k_base", "o200k_base")


def get_tokenizer(name):
    """"byte": one token per UTF-8 byte (ids 0-255) + bos 256, eos 257, pad 258; "word": the bytes, then every grammar
    word as one token, then bos/eos/pad (504 tokens); or a tiktoken encoding (bos = eos = pad = its <|endoftext|>).
    ValueError if it cannot load."""
    if name in ("byte", "word"):
        return TiktokenTokenizer(None, name, words=() if name == "byte" else GRAMMAR_WORDS)
    if name in TIKTOKEN_NAMES:
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:   # no cache and no network (requests/OSError/...), corrupt cache
            raise ValueError(f"tokenizer '{name}' is not cached and could not be downloaded ({type(e).__name__}); "
                             f"use --tokenizer=byte or word") from None
        return TiktokenTokenizer(enc, name, enc.eot_token, enc.eot_token, enc.eot_token)
    raise ValueError(f"unknown tokenizer '{name}'; valid: byte, word, {', '.join(TIKTOKEN_NAMES)}")

# ----------------------------------------------------------------------------------------- synthetic grammar
FUNCTION_WORDS = tuple("The the a code codes for is are all and What ? . was near".split())
ADJECTIVES = tuple("tall new big small red blue green quiet loud warm cold bright dark slow".split())
NOUNS = tuple("dog cat bird tree house road boat lamp chair table garden cloud stone field window river".split())
VERBS = tuple("sees finds likes moves holds passes follows watches paints builds opens carries reaches hides".split())
KEYS = tuple("""alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau
    upsilon phi chi psi omega apple banana cherry grape lemon mango melon olive peach pear plum lime copper silver
    gold iron nickel zinc cobalt mercury venus mars jupiter saturn neptune pluto orion vega sirius lyra draco hydra
    atlas titan""".split())
VALUES = tuple(str(1000 + (1234 + 7919 * i) % 9000) for i in range(128))   # 128 distinct 4-digit numbers
GRAMMAR_WORDS = FUNCTION_WORDS + ADJECTIVES + NOUNS + VERBS + KEYS + VALUES   # 15 + 44 + 58 + 128 = 245
TEMPLATES = ("The ADJ NOUN VERB the NOUN .", "The NOUN VERB a ADJ NOUN .", "The NOUN near the NOUN was ADJ .",
             "The ADJ NOUN and the ADJ NOUN are near a NOUN .")
VARIANTS = ("S", "MK", "MQ", "MV")   # RULER: single, multi-key, multi-query, multi-value
_SLOTS = {"ADJ": ADJECTIVES, "NOUN": NOUNS, "VERB": VERBS}
_TRAIN_SALT, _EVAL_SALT, _TEXT_SALT = 0x7EA1, 0xE7A1, 0x7E47


def train_rng(seed, index):
    """Generator for training row `index` of stream `seed` (row-indexed, so resuming needs only the row count)."""
    return np.random.default_rng([_TRAIN_SALT, seed, index])


def eval_rng(seed, index=0):
    """Generator for evaluation example(s) of `seed`; a different salt from train_rng, so never the same stream."""
    return np.random.default_rng([_EVAL_SALT, seed, index])


@functools.cache
def _grammar(tokenizer):
    """({word: ids of " word"} under `tokenizer`, the templates as lists of id options), cached per tokenizer."""
    w = {word: tokenizer.encode(" " + word) for word in GRAMMAR_WORDS}
    return w, [[[w[x] for x in _SLOTS[s]] if s in _SLOTS else [w[s]] for s in t.split()] for t in TEMPLATES]


def value_range(value_tokens):
    """value_tokens as an inclusive range (lo, hi): an int n is (n, n). ValueError unless 1 <= lo <= hi."""
    lo, hi = (value_tokens, value_tokens) if isinstance(value_tokens, int) else tuple(value_tokens)
    if not 1 <= lo <= hi:
        raise ValueError(f"value_tokens must be >= 1 or a range (lo, hi) with 1 <= lo <= hi, got {value_tokens}")
    return int(lo), int(hi)


def _sample_needles(rng, n_keys, values_per_key, value_tokens):
    """[(key, value words)] in document order: distinct keys, distinct first value words, lengths as value_range."""
    lo, hi = value_range(value_tokens)
    if not 1 <= n_keys <= len(KEYS) or not 1 <= n_keys * values_per_key <= len(VALUES):
        raise ValueError(f"need 1..{len(KEYS)} keys, 1..{len(VALUES)} needles in all and value_tokens >= 1; "
                         f"got {n_keys} keys x {values_per_key} values, value_tokens={value_tokens}")
    keys = [KEYS[i] for i in rng.choice(len(KEYS), n_keys, replace=False)]
    first = rng.choice(len(VALUES), n_keys * values_per_key, replace=False).tolist()
    if lo == hi:   # a fixed length (the original stream: an int value_tokens draws exactly as before)
        rest = rng.integers(0, len(VALUES), size=(len(first), lo - 1)).tolist()
    else:
        sizes = rng.integers(lo, hi + 1, size=len(first)).tolist()
        rest = [rng.integers(0, len(VALUES), size=n - 1).tolist() for n in sizes]
    values = [(VALUES[f], *(VALUES[r] for r in row)) for f, row in zip(first, rest)]
    return [(keys[i // values_per_key], v) for i, v in enumerate(values)]


def _query(kind, keys, values):
    """(question words, answer words, answer mask) of one query line; the mask marks value words."""
    if kind == "S":
        question = ["What", "is", "the", "code", "for", keys[0], "?"]
    elif kind == "MQ":
        question = ["What", "are", "the", "codes", "for"] + " and ".join(keys).split() + ["?"]
    else:   # MV
        question = ["What", "are", "all", "the", "codes", "for", keys[0], "?"]
    answer, mask = [], []
    for i, v in enumerate(values):
        answer += (["and"] if i else []) + list(v)
        mask += ([0] if i else []) + [1] * len(v)
    return question, answer + ["."], mask + [0]


def _ids(words, w, mask=None):
    """(token ids of the words, each word's mask value (default 0) repeated over its tokens)."""
    mask = [0] * len(words) if mask is None else mask
    return [t for x in words for t in w[x]], [m for x, m in zip(words, mask) for _ in w[x]]


def _assemble(rng, length, needles, tail, tail_mask, w, templates):
    """Filler sentences with the needles (in order) at random sentence boundaries, then `tail`: exactly `length`
    tokens. The filler's first sentence is cut at its start if needed (as if the window began mid-text)."""
    needle_ids = [_ids(["The", "code", "for", k, "is", *v, "."], w)[0] for k, v in needles]
    fixed = sum(map(len, needle_ids)) + len(tail)
    if length < fixed:
        raise ValueError(f"length_tokens={length} is too short for {len(needles)} needles and the queries "
                         f"(needs at least {fixed})")
    n_filler, sentences, total = length - fixed, [], 0
    while total < n_filler:
        draws = rng.integers(0, 1 << 30, size=((n_filler - total) // 7 + 1, 1 + max(map(len, templates))))
        for row in draws.tolist():   # column 0 picks the template, column j + 1 fills slot j
            slots = templates[row[0] % len(templates)]
            sentences.append([t for j, opts in enumerate(slots) for t in opts[row[j + 1] % len(opts)]])
            total += len(sentences[-1])
            if total >= n_filler:
                break
    excess = total - n_filler   # < the last sentence's length, so part of a sentence is always left
    while excess > 0:
        if len(sentences[0]) <= excess:
            excess -= len(sentences.pop(0))
        else:
            sentences[0], excess = sentences[0][excess:], 0
    cut = int(total > n_filler)   # then no needle goes before the cut sentence
    where = np.sort(rng.integers(cut, len(sentences) + 1, size=len(needle_ids))).tolist()
    for j in reversed(range(len(needle_ids))):   # from the back, so the earlier boundaries keep their index
        sentences.insert(where[j], needle_ids[j])
    ids = [t for sentence in sentences for t in sentence]
    return ids + tail, [0] * len(ids) + tail_mask


def make_document(rng, length_tokens, tokenizer, n_needles=(1, 4), value_tokens=1, styles=("S",), return_mask=False):
    """A training document of exactly `length_tokens` tokens (no BOS): filler with n needles (n uniform in the
    inclusive range `n_needles`, or an int), then queries for ALL of them with their answers, so each answer is
    predictable from context. Style drawn from `styles`: "S" one query line per needle (random order), "MK" one
    needle asked, the others distract (the NIAH multi-key task: no answer can be had by elimination), "MQ" one line
    asking every key, "MV" one key with n values asked in one line (answers in order of appearance).
    return_mask=True also returns a 0/1 list marking the answer value tokens (e.g. to up-weight them in the loss)."""
    w, templates = _grammar(tokenizer)
    lo, hi = (n_needles, n_needles) if isinstance(n_needles, int) else n_needles
    n = int(rng.integers(lo, hi + 1))
    style = styles[int(rng.integers(len(styles)))]
    if style not in VARIANTS:
        raise ValueError(f"unknown document style '{style}'; valid: {', '.join(VARIANTS)}")
    needles = _sample_needles(rng, 1 if style == "MV" else n, n if style == "MV" else 1, value_tokens)
    if style in ("S", "MK"):
        asked = rng.permutation(n).tolist()[:1 if style == "MK" else n]
        lines = [_query("S", [needles[i][0]], [needles[i][1]]) for i in asked]
    elif style == "MQ":
        order = rng.permutation(n).tolist()
        lines = [_query("MQ", [needles[i][0] for i in order], [needles[i][1] for i in order])]
    else:
        lines = [_query("MV", [needles[0][0]], [v for _, v in needles])]
    tail, tail_mask = _ids([x for q, a, _ in lines for x in q + a], w,
                           [m for q, _, mask in lines for m in [0] * len(q) + mask])
    ids, mask = _assemble(rng, length_tokens, needles, tail, tail_mask, w, templates)
    return (ids, mask) if return_mask else ids


def make_niah_example(rng, variant, length_tokens, tokenizer, n_needles=4, n_queries=None, value_tokens=1, bos=True):
    """One RULER-style NIAH example. variant: "S" one needle; "MK" n_needles keys, one asked (the rest distract);
    "MQ" n_needles keys, n_queries of them (default all) asked in one line; "MV" one key with n_needles values.
    Returns dict(prompt_ids (BOS first if bos), answers: list[str], answer_ids: ids of " answer" each,
    target_ids: the reference continuation " V1 and V2 .", variant). The prompt ends right after the query's "?".
    Lengths: prompt without BOS + target = length_tokens, the same span as a training document of that length."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown NIAH variant '{variant}'; valid: {', '.join(VARIANTS)}")
    w, templates = _grammar(tokenizer)
    n = 1 if variant == "S" else n_needles
    needles = _sample_needles(rng, 1 if variant == "MV" else n, n if variant == "MV" else 1, value_tokens)
    if variant in ("S", "MK"):
        asked = [needles[int(rng.integers(n))]]
    elif variant == "MQ":
        q = n if n_queries is None else n_queries
        if not 1 <= q <= n:
            raise ValueError(f"n_queries={q} must be in 1..n_needles={n}")
        asked = [needles[i] for i in rng.choice(n, q, replace=False).tolist()]
    else:
        asked = needles
    keys = [asked[0][0]] if variant == "MV" else [k for k, _ in asked]
    question, answer, _ = _query("S" if variant == "MK" else variant, keys, [v for _, v in asked])
    q_ids, a_ids = _ids(question, w)[0], _ids(answer, w)[0]
    ids, _ = _assemble(rng, length_tokens, needles, q_ids + a_ids, [0] * (len(q_ids) + len(a_ids)), w, templates)
    answers = [" ".join(v) for _, v in asked]
    return dict(prompt_ids=([tokenizer.bos_id] if bos else []) + ids[:len(ids) - len(a_ids)], answers=answers,
                answer_ids=[tokenizer.encode(" " + a) for a in answers], target_ids=a_ids, variant=variant)


def niah_score(prediction, answers):
    """RULER string_match_all: fraction of answers found (case-insensitive substring) in the prediction."""
    if not answers:
        raise ValueError("answers is empty; need at least one reference answer")
    p = prediction.lower()
    return sum(a.lower() in p for a in answers) / len(answers)


class SyntheticData:
    """Training batches of synthetic documents: row r of the stream is BOS + make_document(train_rng(seed, r), seq_len).
    The state is the row counter, so resuming from state_dict() gives exactly the batches an unbroken run would."""

    def __init__(self, tokenizer, seq_len, seed, n_needles=(1, 4), value_tokens=1, styles=("S",)):
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.n_needles, self.value_tokens, self.styles = n_needles, value_tokens, tuple(styles)
        self.rows = 0

    def get_batch(self, batch_size, with_mask=False):
        """-> LongTensor [B, seq_len + 1] (x = batch[:, :-1], y = batch[:, 1:]); with_mask=True also returns a
        bool [B, seq_len + 1] marking answer value tokens (weights for the targets: mask[:, 1:])."""
        docs = [make_document(train_rng(self.seed, r), self.seq_len, self.tokenizer, self.n_needles, self.value_tokens,
                              self.styles, return_mask=True) for r in range(self.rows, self.rows + batch_size)]
        self.rows += batch_size
        batch = torch.tensor([[self.tokenizer.bos_id] + ids for ids, _ in docs], dtype=torch.long)   # [B, seq_len + 1]
        return (batch, torch.tensor([[0] + mask for _, mask in docs], dtype=torch.bool)) if with_mask else batch

    def state_dict(self):
        return {"seed": self.seed, "rows": self.rows}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this stream has seed {self.seed}")
        self.rows = int(state["rows"])

# ------------------------------------------------------------------------------------------------------ files
EXTENSIONS = (".txt", ".jsonl", ".parquet")


def data_files(path):
    """The data files of a path: the file itself, or a folder's .txt/.jsonl/.parquet files, recursively, sorted."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data path '{path}' does not exist; pass a .txt, .jsonl or .parquet file or a folder of them")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
        if not files:
            raise ValueError(f"folder '{path}' holds no data files; valid extensions: {', '.join(EXTENSIONS)}")
        return files
    if p.suffix not in EXTENSIONS:
        raise ValueError(f"unsupported data file '{path}' (extension '{p.suffix}'); valid: "
                         f"{', '.join(EXTENSIONS)} or a folder of them")
    return [p]


def _records(f):
    """Rows of a .jsonl or .parquet file as dicts."""
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(f).to_pylist()
    rows = []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} line {i} is not valid JSON ({e.msg}); each line must be a JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{f} line {i} is not a JSON object; each line must be an object with a 'text' field")
            rows.append(row)
    return rows


def load_documents(path):
    """Documents (strings) of a file or folder; empty documents are dropped. See the module docstring for formats."""
    docs = []
    for f in data_files(path):
        if f.suffix == ".txt":
            docs.append(f.read_text(encoding="utf-8"))
            continue
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            names = pq.read_schema(f).names
            if "text" not in names and "prompt" not in names:
                raise ValueError(f"parquet file '{f}' has no 'text' or 'prompt' column (columns: {', '.join(names)}); "
                                 f"valid: a 'text' column, or 'prompt' with an optional 'answer'/'answers' column")
        for i, row in enumerate(_records(f), 1):
            if "text" in row:
                docs.append(row["text"])   # None or "": dropped below
            elif "prompt" in row:
                prompt, ans = row["prompt"] or "", row.get("answer", row.get("answers"))
                ans = (ans[0] if ans else "") if isinstance(ans, (list, tuple)) else ans or ""   # the first answer
                docs.append(prompt + ("" if not ans or prompt[-1:].isspace() else " ") + ans)
            else:
                raise ValueError(f"{f} line {i} has no 'text' field; each line must be an object with a 'text' string")
    return [d for d in docs if d]


def load_prompt_answer(path):
    """Post-training pairs [dict(prompt, answers: list[str])] from .parquet/.jsonl rows with 'prompt' and
    'answer' or 'answers' (a string or a list of strings), e.g. the RULER-QA parquet files."""
    pairs = []
    for f in data_files(path):
        if f.suffix == ".txt":
            raise ValueError(f"'{f}' is a .txt file; prompt/answer pairs need .parquet or .jsonl with 'prompt' "
                             f"and 'answer'")
        for row in _records(f):
            if "prompt" not in row or "answer" not in row and "answers" not in row:
                raise ValueError(f"'{f}' has no 'prompt' and 'answer'/'answers' fields (has: {', '.join(row)})")
            ans = row.get("answer", row.get("answers"))
            pairs.append(dict(prompt=row["prompt"], answers=[] if ans is None else [ans] if isinstance(ans, str)
                              else [str(a) for a in ans]))
    return pairs


class TextData:
    """Packed training windows from files. Each document becomes BOS + tokens + EOS; an epoch concatenates the
    documents in a seed-shuffled order, skips a seeded random offset (< the leftover), and cuts consecutive windows
    of seq_len + 1 tokens; the leftover tokens are dropped and the next epoch reshuffles (wraps around forever)."""

    def __init__(self, path, tokenizer, seq_len, seed):
        self.seq_len, self.seed = seq_len, seed
        self.docs = [np.array([tokenizer.bos_id] + tokenizer.encode(d) + [tokenizer.eos_id], dtype=np.int64)
                     for d in load_documents(path)]
        n = sum(len(d) for d in self.docs)
        if n < seq_len + 1:
            raise ValueError(f"data file {path} has {n} tokens; need at least seq_len+1 = {seq_len + 1}")
        self.n_tokens, self.windows_per_epoch = n, n // (seq_len + 1)
        self.epoch, self.window, self._cached = 0, 0, (None, None)

    def _stream(self, epoch):
        """The epoch's token stream, from its first window on. # [windows_per_epoch * (seq_len + 1)]"""
        if self._cached[0] != epoch:
            rng = np.random.default_rng([_TEXT_SALT, self.seed, epoch])
            stream = np.concatenate([self.docs[i] for i in rng.permutation(len(self.docs))])
            used = self.windows_per_epoch * (self.seq_len + 1)
            start = int(rng.integers(0, self.n_tokens - used + 1))
            self._cached = (epoch, stream[start:start + used])
        return self._cached[1]

    def get_batch(self, batch_size, with_mask=False):
        """-> LongTensor [B, seq_len + 1] (x = batch[:, :-1], y = batch[:, 1:]); with_mask: (batch, None), no answers"""
        L, rows = self.seq_len + 1, []
        for _ in range(batch_size):
            if self.window == self.windows_per_epoch:
                self.epoch, self.window = self.epoch + 1, 0
            rows.append(self._stream(self.epoch)[self.window * L:(self.window + 1) * L])
            self.window += 1
        batch = torch.from_numpy(np.stack(rows))   # [B, seq_len + 1]
        return (batch, None) if with_mask else batch

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "window": self.window}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this data has seed {self.seed}")
        self.epoch, self.window = int(state["epoch"]), int(state["window"])
