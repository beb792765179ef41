"""Answer-scoring metrics for the paper's evaluations (REFINE paper, evaluation section): pure string functions that
follow their reference implementations rule for rule, quirks that change scores included (each named where it is):
- RULER QA: `string_match_part` (NVIDIA/RULER) after the REFINE authors' post-processing
  (princetonvisualai/ReFINE, verl/utils/reward_score/ruler.py).
- LongBench: THUDM/LongBench `eval.py` + `metrics.py` (mode="longbench"), or the REFINE authors' copy of it
  (verl/utils/reward_score/longbench.py, mode="refine"), which cuts QA answers at their first newline.
`rouge` and `rapidfuzz` are imported only by the ROUGE and code-similarity metrics.
"""
import re
import string
from collections import Counter

# The 50 TREC fine-grained question types, in the order of LongBench's `all_classes` field (the order matters:
# see classification_score). "Lasting time of somethin" is misspelt in LongBench's data too; keep it.
TREC_CLASSES = (
    "Food", "Date", "Order, rank", "Speed", "Disease and medicine", "Word with a special property",
    "Abbreviation", "Language", "Letter like a-z", "Other entity", "Animal", "Expression abbreviated", "Price",
    "Techniques and method", "Musical instrument", "Mountain", "Currency name", "Event", "Product", "State",
    "Individual", "Organ of body", "Reason", "Manner of an action", "City", "Religion",
    "Invention, book and other creative piece", "Distance, linear measure", "Temperature",
    "Postcode or other code", "Size, area and volume", "Sport", "Country", "Other location",
    "Lasting time of somethin", "Equivalent term", "Description of something", "Weight", "Vehicle", "Color",
    "Other number", "Definition of something", "Element and substance", "Description of a person",
    "Symbols and sign", "Number of something", "Plant", "Percent, fraction", "Group or organization of person",
    "Title of a person",
)

# Official LongBench dataset2maxlen (the 14 English tasks the REFINE data ships). The REFINE scripts instead cap
# every task at 32 new tokens (the official REFINE scripts); the parquet's max_gen_tokens column equals this table.
LONGBENCH_MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lcc": 64, "repobench-p": 64,
}

# Task -> metric name (LongBench eval.py dataset2metric).
LONGBENCH_METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "triviaqa": "qa_f1",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "samsum": "rouge_l",
    "trec": "classification", "lcc": "code_sim", "repobench-p": "code_sim",
}

# LongBench cuts the prediction at its first line for these few-shot tasks (eval.py; "lsht" is Chinese, unused).
_FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_MISSING = "pip install rouge rapidfuzz: needed for LongBench's ROUGE/code metrics"


def _checked(prediction, answers):
    """(prediction, answers as a non-empty list of str: lists, tuples, numpy arrays from pandas are accepted)."""
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a str (the decoded generation), got {type(prediction).__name__}")
    if isinstance(answers, str):
        raise ValueError("answers must be a list of reference strings, got a single str; wrap it in a list")
    answers = list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must be a non-empty list of str, got {answers!r}")
    return prediction, answers

# ----------------------------------------------------------------------------------------------- RULER QA
def ruler_qa_score(prediction: str, answers: list, *, mode: str = "refine") -> float:
    """RULER string_match_part for one example: 1.0 if any reference answer is a case-insensitive substring of the
    cleaned prediction, else 0.0.

    Cleaning (RULER postprocess_pred): strip, replace control characters [\\x00-\\x1f] by newlines, strip again.
    mode="refine" (the paper's numbers): first cut the raw prediction at its first "\\n" -- NOT stripped before, so
    a generation that opens with a newline scores 0. mode="ruler": NVIDIA RULER as released, no first-line cut.
    """
    prediction, answers = _checked(prediction, answers)
    if mode not in ("refine", "ruler"):
        raise ValueError(f"mode must be one of ('refine', 'ruler'), got {mode!r}")
    if mode == "refine":
        prediction = prediction.split("\n")[0]
    prediction = _CONTROL_CHARS.sub("\n", prediction.strip()).strip().lower()
    return float(any(a.lower() in prediction for a in answers))

# ----------------------------------------------------------------------------------------------- LongBench helpers
def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lowercase, drop ASCII punctuation, drop the words a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised prediction and ground truth (bag of words, counts clipped)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F (summary level) from the `rouge` package, as LongBench computes it. Like LongBench, any error of the
    package scores 0.0: an empty hypothesis or reference (ValueError), or a sentence that overflows the recursion
    limit in the package's recursive LCS backtrack (RecursionError, e.g. 512 tokens without a full stop)."""
    try:
        from rouge import Rouge
    except ImportError as err:
        raise ImportError(_MISSING) from err
    try:
        scores = Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # LongBench: bare `except: return 0.0`
        return 0.0
    return float(scores["rouge-l"]["f"])


def classification_score(prediction: str, ground_truth: str, all_classes=TREC_CLASSES) -> float:
    """LongBench classification score: 1/#matched if the true class is among the matched class names, else 0.

    A class matches if its name is a (case-sensitive) substring of the prediction. Matched names that are strict
    substrings of the ground truth are dropped. LongBench drops them from the list it is iterating over, so the
    match right after each dropped one is never checked; this is reproduced (hence all_classes' order matters).
    """
    all_classes = list(all_classes)
    if len(set(all_classes)) != len(all_classes):
        raise ValueError("all_classes must not contain duplicate class names")
    matched = [name for name in all_classes if name in prediction]
    kept, check = [], True
    for name in matched:
        if check and name in ground_truth and name != ground_truth:
            check = False  # dropped; LongBench's in-place list.remove makes it skip the next match
            continue
        kept.append(name)
        check = True
    # LongBench's difflib fallback sits behind `if em_match_list != 0`, which is always true: never reached.
    return 1.0 / len(kept) if ground_truth in kept else 0.0


def _first_code_line(prediction: str, default: str) -> str:
    """First line (after leading newlines) containing none of '`', '#', '//'; `default` if there is none."""
    lines = prediction.lstrip("\n").split("\n")
    return next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), default)


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio (with python-Levenshtein): 100 if equal, 0 if either is empty, else
    round(100 * (len(a)+len(b)-indel_distance) / (len(a)+len(b))) with Python's round."""
    try:
        from rapidfuzz.distance import Indel
    except ImportError as err:
        raise ImportError(_MISSING) from err
    if not a or not b:
        return 100 if a == b else 0
    total = len(a) + len(b)
    return int(round(100 * (total - Indel.distance(a, b)) / total))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """LongBench code edit similarity: fuzz ratio / 100 between the prediction's first code line and the reference."""
    return _fuzz_ratio(_first_code_line(prediction, ""), ground_truth) / 100

# ----------------------------------------------------------------------------------------------- LongBench task score
def longbench_score(task: str, prediction: str, answers: list, all_classes=None, *, mode: str = "longbench") -> float:
    """Score one LongBench prediction: the task's metric, max over the reference answers (LongBench eval.py).

    all_classes: class names for "trec" (default TREC_CLASSES); ignored by other tasks.
    mode="longbench": THUDM/LongBench -- only trec/triviaqa/samsum predictions are cut at their first line
    (after leading newlines). mode="refine": the REFINE authors' scorer, which also cuts the QA-F1 tasks'
    predictions at the first "\\n" (without skipping leading newlines) and, for code tasks, compares the whole
    prediction when it has no code line (LongBench compares "").
    """
    if task not in LONGBENCH_METRIC:
        raise ValueError(f"unknown LongBench task {task!r}; valid tasks: {sorted(LONGBENCH_METRIC)}")
    if mode not in ("longbench", "refine"):
        raise ValueError(f"mode must be one of ('longbench', 'refine'), got {mode!r}")
    prediction, answers = _checked(prediction, answers)
    metric = LONGBENCH_METRIC[task]
    if task in _FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    elif mode == "refine" and metric == "qa_f1":
        prediction = prediction.split("\n")[0]
    if metric == "code_sim":
        prediction = _first_code_line(prediction, prediction if mode == "refine" else "")
    elif mode == "refine":
        # REFINE strips. This can move ROUGE: whitespace after the last full stop is one more (empty) word.
        prediction = prediction.strip()
    classes = TREC_CLASSES if all_classes is None else all_classes
    score = {"qa_f1": qa_f1_score, "rouge_l": rouge_l_score, "code_sim": lambda p, gt: _fuzz_ratio(p, gt) / 100,
             "classification": lambda p, gt: classification_score(p, gt, classes)}[metric]
    return max(0.0, *(score(prediction, gt) for gt in answers))
