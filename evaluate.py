"""Evaluation (the REFINE paper's benchmarks): greedy generation, RULER needle-in-a-haystack, RULER multi-document QA,
LongBench, next-token validation, and test-time training with REFINE (the paper's third phase).

Callable alone (`python evaluate.py --help`) and from train.py. Scores are fractions in [0, 1]; tables print
percentages. Generation prefills a batch in ONE forward pass (right padding: the model is causal, so the state after
each row's last token is exact) and then decodes one token per step from the fixed-size fast-weight state.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import metrics
import rollout

# ----------------------------------------------------------------------------------------------- generation
def pad_batch(rows, pad_id, device):
    """Right-pad token lists -> (ids [B, L], lengths [B])."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id=None, temperature=0.0, generator=None):
    """Continue each prompt (list of token ids) by up to max_new_tokens tokens; greedy when temperature == 0.
    A row stops at eos_id (not included in its output). -> list of generated id lists, in the prompts' order."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 0 and temperature >= 0, got {max_new_tokens}, {temperature}")
    outputs, done = [[] for _ in prompts], [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        ids, lengths = pad_batch(prompts, 0, model.lm_head.weight.device)         # [B, T] right-padded, [B]
        last = (lengths - 1)[:, None]                                              # [B, 1] each row's last token
        out = model(ids, snapshot_at=last)                                         # one prefill for the batch
        state = out.snapshots                                                      # row b: state after last[b]
        logits = out.snapshot_logits                                               # [B, V] at each last token
        for i in range(max_new_tokens):
            tok = (logits.argmax(-1) if temperature == 0                           # [B] greedy or sampled
                   else rollout.sample_token(logits, temperature, generator=generator)[0])
            for b, t in enumerate(tok.tolist()):
                done[b] = done[b] or t == eos_id
                if not done[b]:
                    outputs[b].append(t)
            if all(done) or i == max_new_tokens - 1:
                break
            step = model.step(tok[:, None], state)                                 # O(1) in the prompt length
            state, logits = step.state, step.logits[:, 0]
    finally:
        model.train(was_training)
    return outputs


def generate_all(model, prompts, max_new_tokens, eos_id=None, batch_size=8):
    """Greedy generation for many prompts in batches of similar length (less padding). max_new_tokens: an int or
    one int per prompt (a batch decodes to its largest; greedy outputs are then cut, which is exact)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gen = generate(model, [prompts[i] for i in idx], max(limits[i] for i in idx), eos_id)
        for i, g in zip(idx, gen):
            outputs[i] = g[:limits[i]]
    return outputs


def decode(tokenizer, ids):
    """Text of generated ids; ids beyond the tokenizer's vocabulary (a padded head: 504 words, 512 rows) are dropped."""
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


def encode_prompt(tokenizer, text, max_prompt_tokens=None):
    """BOS + tokens of `text`; when longer than max_prompt_tokens (BOS included) the MIDDLE is cut out, keeping the
    first and last halves as LongBench's pred.py does (the instruction and the question survive)."""
    ids = tokenizer.encode(text)
    if max_prompt_tokens is not None and max_prompt_tokens < 3:
        raise ValueError(f"max_prompt_tokens must be >= 3 (BOS + head + tail), got {max_prompt_tokens}")
    keep = len(ids) if max_prompt_tokens is None else max_prompt_tokens - 1
    if len(ids) > keep:
        ids = ids[:keep // 2] + ids[len(ids) - (keep - keep // 2):]               # LongBench: first + last half
    return [tokenizer.bos_id] + ids

# ----------------------------------------------------------------------------------------------- NIAH
def niah_examples(tokenizer, variant, length, n_examples=100, seed=0, n_needles=4, value_tokens=1):
    """The evaluation examples of one variant@length: make_niah_example(eval_rng(seed, i)), i < n_examples."""
    return [data.make_niah_example(data.eval_rng(seed, i), variant, length, tokenizer, n_needles=n_needles,
                                   value_tokens=value_tokens) for i in range(n_examples)]


def score_niah(predictions, examples):
    """Mean RULER string_match_all of decoded predictions (str) against the examples' answers."""
    return sum(data.niah_score(p, ex["answers"]) for p, ex in zip(predictions, examples, strict=True)) / len(examples)


def eval_niah(model, tokenizer, variants=("S", "MK", "MQ", "MV"), lengths=(256, 512, 1024), n_examples=100, seed=0,
              batch_size=32, n_needles=4, value_tokens=1):
    """Greedy NIAH accuracy per variant and length -> {"S@256": score, ...}; answers get len(target) + 2 tokens."""
    results = {}
    for variant in variants:
        for length in lengths:
            examples = niah_examples(tokenizer, variant, length, n_examples, seed, n_needles, value_tokens)
            gen = generate_all(model, [ex["prompt_ids"] for ex in examples],
                               [len(ex["target_ids"]) + 2 for ex in examples], tokenizer.eos_id, batch_size)
            results[f"{variant}@{length}"] = score_niah([decode(tokenizer, g) for g in gen], examples)
    return results


def format_table(results):
    """A markdown table variant x length (percent) from eval_niah's {"V@L": score}, with a row average."""
    variants, lengths = (list(dict.fromkeys(key.split("@")[i] for key in results)) for i in (0, 1))   # in order
    lines = ["| variant | " + " | ".join(lengths) + " | avg |", "|---" * (len(lengths) + 2) + "|"]
    for v in variants:
        row = [results.get(f"{v}@{n}") for n in lengths]
        have = [x for x in row if x is not None]
        cells = ["-" if x is None else f"{100 * x:.1f}" for x in row] + [f"{100 * sum(have) / len(have):.1f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------- RULER QA, LongBench
def eval_ruler_qa(model, tokenizer, path, max_new_tokens=32, limit=None, batch_size=4, max_prompt_tokens=None,
                  mode="refine"):
    """RULER multi-document QA (string_match_part) on a prompt/answer file -> dict(score, n, predictions)."""
    rows = data.load_prompt_answer(path)[:limit]
    if not rows:
        raise ValueError(f"'{path}' holds no prompt/answer rows")
    prompts = [encode_prompt(tokenizer, r["prompt"], max_prompt_tokens) for r in rows]
    preds = [decode(tokenizer, g) for g in generate_all(model, prompts, max_new_tokens, tokenizer.eos_id, batch_size)]
    scores = [metrics.ruler_qa_score(p, r["answers"], mode=mode) for p, r in zip(preds, rows)]
    return dict(score=sum(scores) / len(scores), n=len(scores), predictions=preds)


def eval_longbench(model, tokenizer, paths, limit=None, mode="longbench", batch_size=1, max_prompt_tokens=None,
                   max_new_tokens=None):
    """LongBench on parquet files (columns task, prompt, answers) -> {task: score, ..., "average": mean over tasks}.
    New tokens per task from metrics.LONGBENCH_MAX_NEW_TOKENS unless max_new_tokens is given (REFINE used 32).
    limit: rows per file. mode: metrics.longbench_score's mode ("longbench" or "refine")."""
    import pyarrow.parquet as pq
    rows_by_task = {}
    files = [f for p in ([paths] if isinstance(paths, (str, Path)) else paths) for f in data.data_files(p)]
    for f in [f for f in files if f.suffix == ".parquet"]:
        missing = {"task", "prompt", "answers"} - set(pq.read_schema(f).names)
        if missing:
            raise ValueError(f"'{f}' lacks the column(s) {', '.join(sorted(missing))}; LongBench files need task, "
                             f"prompt, answers")
        for row in pq.read_table(f, columns=["task", "prompt", "answers"]).to_pylist()[:limit]:
            rows_by_task.setdefault(row["task"], []).append(row)
    if not rows_by_task:
        raise ValueError(f"no LongBench rows in {paths} (limit={limit})")
    results = {}
    for task, rows in rows_by_task.items():
        if task not in metrics.LONGBENCH_MAX_NEW_TOKENS:
            raise ValueError(f"unknown LongBench task '{task}'; valid: {', '.join(metrics.LONGBENCH_MAX_NEW_TOKENS)}")
        n_new = max_new_tokens or metrics.LONGBENCH_MAX_NEW_TOKENS[task]
        prompts = [encode_prompt(tokenizer, r["prompt"], max_prompt_tokens) for r in rows]
        gen = generate_all(model, prompts, n_new, tokenizer.eos_id, batch_size)
        results[task] = sum(metrics.longbench_score(task, decode(tokenizer, g), r["answers"], mode=mode)
                            for g, r in zip(gen, rows)) / len(rows)
    results["average"] = sum(results.values()) / len(results)
    return results

# ----------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def eval_validation(model, batches):
    """Next-token loss and greedy (argmax) accuracy, token-weighted over batches [B, T+1] -> dict(loss, acc)."""
    was_training = model.training
    model.eval()
    try:
        device, loss_sum, hits, count = model.lm_head.weight.device, 0.0, 0, 0
        for batch in (b.to(device) for b in batches):
            x, y = batch[:, :-1], batch[:, 1:]                                     # [B, T] inputs, targets
            logits = model(x).logits                                               # [B, T, V]
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()   # logits >= fp32
            hits += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no validation tokens: batches must be a non-empty list of [B, T+1] tensors with T >= 1")
    return dict(loss=loss_sum / count, acc=hits / count)

# ----------------------------------------------------------------------------------------------- test-time training
def ttt_adapt(model, optimizer, prompt_ids, cfg, steps, generator=None):
    """Adapt on one prompt (list of ids) with `steps` REFINE steps (step.train_step on a batch of one: x =
    prompt[:-1], y = prompt[1:], L = lambda_RL * L_NSP + lambda_SFT * L_NTP). -> the last step's stats."""
    from step import train_step
    need = max(cfg.n_chunks, cfg.rollout_len + 1) + 1
    if len(prompt_ids) < need:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is too short for test-time training with "
                         f"n_chunks={cfg.n_chunks}, rollout_len={cfg.rollout_len}; need at least {need} tokens")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.lm_head.weight.device)[None]   # [1, L + 1]
    was_training, stats = model.training, {}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    try:
        for i in range(steps):
            stats = train_step(model, optimizer, ids, cfg, i, 0, 1, True, generator=generator)
    finally:
        model.train(was_training)
    return stats


def ttt_evaluate(model, optimizer, examples, cfg, steps, tokenizer, max_new_tokens, score_fn, reset=True,
                 generator=None):
    """Test-time training: for each example (dict prompt_ids, answers) score the greedy answer, adapt on the prompt
    (ttt_adapt), score again. score_fn(prediction: str, answers) -> float. reset=True restores the parameters and
    the optimizer state after every example; reset=False keeps adapting (the official code).
    -> dict(base, adapted: mean scores, n, per_example: [dict(base, adapted, base_prediction, adapted_prediction)])."""
    if not examples:
        raise ValueError("examples is empty; need at least one dict(prompt_ids, answers)")
    per_example = []
    for ex in examples:
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())) if reset else None
        preds = [decode(tokenizer, generate(model, [ex["prompt_ids"]], max_new_tokens, tokenizer.eos_id)[0])]
        ttt_adapt(model, optimizer, ex["prompt_ids"], cfg, steps, generator)
        preds.append(decode(tokenizer, generate(model, [ex["prompt_ids"]], max_new_tokens, tokenizer.eos_id)[0]))
        if reset:
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
        per_example.append(dict(base=score_fn(preds[0], ex["answers"]), adapted=score_fn(preds[1], ex["answers"]),
                                base_prediction=preds[0], adapted_prediction=preds[1]))
    n = len(per_example)
    return dict(base=sum(e["base"] for e in per_example) / n, adapted=sum(e["adapted"] for e in per_example) / n,
                n=n, per_example=per_example)

# ----------------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse prints the usage too)
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def load_checkpoint(path, tokenizer=None, dtype=None, device=None):
    """(model, tokenizer, folder) of a checkpoint folder or of a training out_dir holding one in hf/ (looked at first:
    an out_dir's own config.json is the run's). The tokenizer: the folder's tokenizer.json, else the one its
    config.json names (train.py writes it), else `tokenizer`."""
    import checkpoint
    folder = next((d for d in (Path(path) / "hf", Path(path)) if (d / "config.json").is_file()), None)
    if folder is None:
        raise ValueError(f"no checkpoint at '{path}': expected config.json + model.safetensors there or in "
                         f"'{Path(path) / 'hf'}'")
    model = checkpoint.load_pretrained(str(folder), dtype=dtype, device=device)
    if (folder / "tokenizer.json").is_file():
        return model, checkpoint.load_tokenizer(folder), folder
    name = json.loads((folder / "config.json").read_text()).get("tokenizer") or tokenizer
    if name is None:
        raise ValueError(f"'{folder}' names no tokenizer (no tokenizer.json, no \"tokenizer\" in config.json); "
                         f"pass --tokenizer byte|word|gpt2|...")
    return model, data.get_tokenizer(name), folder


def main(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n"
                       "  python evaluate.py --ckpt out/ --task niah --lengths 256,512,1024 --n 100 --out r.json\n"
                       "  python evaluate.py --ckpt out/hf --task ruler --data ruler_squadqa_lact_4096.parquet\n"
                       "  python evaluate.py --ckpt out/ --task longbench --data longbench/ --limit 20\n"
                       "  python evaluate.py --ckpt out/ --task val --data books.jsonl --seq-len 1024")
    p.add_argument("--ckpt", required=True, help="a Hugging Face style folder (config.json + model.safetensors), "
                                                 "or a training out_dir holding one in hf/")
    p.add_argument("--task", required=True, choices=("niah", "ruler", "longbench", "val"),
                   help="niah: synthetic RULER needle-in-a-haystack (S/MK/MQ/MV); ruler: RULER QA parquet; "
                        "longbench: LongBench parquet files or folder; val: NTP loss/accuracy on a text file")
    p.add_argument("--data", nargs="+", help="data file(s) or folder for ruler / longbench / val")
    p.add_argument("--tokenizer", help="used when the checkpoint names none (byte, word, gpt2, ...)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: checkpoint's")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="S,MK,MQ,MV", help="niah: comma-separated variants")
    p.add_argument("--lengths", default="256,512,1024", help="niah: comma-separated lengths")
    p.add_argument("--n", type=int, default=100, help="niah: examples per variant@length")
    p.add_argument("--n-needles", type=int, default=4)
    p.add_argument("--value-tokens", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="ruler/longbench: first rows only (per file)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="ruler: 32; longbench: per task unless given")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cut the middle of longer prompts")
    p.add_argument("--mode", default=None, help="scoring: ruler refine|ruler, longbench longbench|refine")
    p.add_argument("--seq-len", type=int, default=1024, help="val: tokens per row")
    p.add_argument("--n-batches", type=int, default=8, help="val: batches")
    args = p.parse_args(argv)
    try:
        if args.task != "niah" and not args.data:
            raise ValueError(f"--task {args.task} needs --data")
        if args.task in ("ruler", "val") and len(args.data) > 1:
            raise ValueError(f"--task {args.task} takes one --data path (a file or a folder), got {len(args.data)}")
        for path in args.data or []:
            if not Path(path).exists():
                raise ValueError(f"data path '{path}' does not exist")
        if not all(n.isdigit() for n in args.lengths.split(",")):
            raise ValueError(f"--lengths takes comma-separated integers, got '{args.lengths}'")
        device = args.device or ("cuda" if torch.cuda.is_available() else
                                 "mps" if torch.backends.mps.is_available() else "cpu")
        model, tokenizer, ckpt = load_checkpoint(args.ckpt, args.tokenizer, args.dtype and getattr(torch, args.dtype),
                                                 device)
        if args.task == "niah":
            results = eval_niah(model, tokenizer, tuple(args.variants.split(",")),
                                tuple(int(n) for n in args.lengths.split(",")), args.n, args.seed,
                                args.batch_size or 32, args.n_needles, args.value_tokens)
            print(format_table(results))
        elif args.task == "ruler":
            results = eval_ruler_qa(model, tokenizer, args.data[0], args.max_new_tokens or 32, args.limit,
                                    args.batch_size or 4, args.max_prompt_tokens, args.mode or "refine")
            print(f"RULER QA {args.data[0]}: {100 * results['score']:.1f} (n={results['n']})")
        elif args.task == "longbench":
            results = eval_longbench(model, tokenizer, args.data, args.limit, args.mode or "longbench",
                                     args.batch_size or 1, args.max_prompt_tokens, args.max_new_tokens)
            print("\n".join(f"{task:>16}: {100 * s:.1f}" for task, s in results.items()))
        else:
            text = data.TextData(args.data[0], tokenizer, args.seq_len, args.seed)
            results = eval_validation(model, [text.get_batch(args.batch_size or 8) for _ in range(args.n_batches)])
            print(f"val loss {results['loss']:.4f}  acc {results['acc']:.4f}")
        if args.out:
            Path(args.out).write_text(json.dumps(dict(ckpt=str(ckpt), args=vars(args), results=results), indent=1))
    except (ValueError, OSError, ImportError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
