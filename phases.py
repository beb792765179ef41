"""The two phases that work on prompt/answer pairs: the paper's post-training and test-time training.

post: the nested loop. For each batch of pairs: one REFINE step on the PROMPTS (NTP + NSP), then one SFT step on
      the reference answer given the prompt (cross-entropy on the answer tokens + EOS), same AdamW state. With
      --objective=sft only the answer step runs (the SFT-only baseline). The score on the paired test split
      (--eval_data, or synthetic held-out NIAH) is printed before and after.
ttt:  for each test example: adapt on its prompt with REFINE, answer greedily, score, then restore the weights and
      the optimiser (ttt_reset=True; False keeps the official cumulative behaviour). Scores with and without
      adaptation are reported on the same examples.
Pairs come from a RULER-QA style parquet (columns prompt, answer) or, with --data=synthetic, from the built-in NIAH
generator (variants S, MK, MQ, MV in turn; training pairs and test pairs drawn from disjoint seed streams).
"""
import json
import os
import random

import torch

import data as datalib
from checkpoint import save_pretrained
from evaluate import decode, encode_prompt, generate_all, pad_batch, ttt_evaluate
from metrics import ruler_qa_score
from step import lr_at, train_step


def load_pairs(cfg, tok, path, split, n):
    """-> list of dict(prompt_ids, answer_ids, answers) and the score function for them."""
    if path == "synthetic":
        rng = datalib.train_rng if split == "train" else datalib.eval_rng
        examples = [datalib.make_niah_example(rng(cfg.seed, i), datalib.VARIANTS[i % 4], cfg.seq_len, tok,
                                              n_needles=cfg.n_needles, value_tokens=cfg.value_tokens)
                    for i in range(n)]
        return [dict(prompt_ids=ex["prompt_ids"], answer_ids=ex["target_ids"], answers=ex["answers"])
                for ex in examples], datalib.niah_score
    rows = [r for r in datalib.load_prompt_answer(path)[:n] if r["answers"]]
    return [dict(prompt_ids=encode_prompt(tok, r["prompt"], cfg.seq_len), answers=r["answers"],
                 answer_ids=tok.encode(" " + r["answers"][0])) for r in rows], ruler_qa_score


def score(model, tok, pairs, score_fn, max_new_tokens=32):
    outs = generate_all(model, [p["prompt_ids"] for p in pairs], max_new_tokens, tok.eos_id)
    return sum(score_fn(decode(tok, o), p["answers"]) for o, p in zip(outs, pairs)) / len(pairs)


def post_train(cfg, model, opt, tok, device):
    train_pairs, _ = load_pairs(cfg, tok, cfg.data, "train", cfg.batch_size * cfg.max_steps)
    test_pairs, score_fn = load_pairs(cfg, tok, cfg.eval_data or cfg.data, "test", cfg.eval_examples)
    results = {"before": score(model, tok, test_pairs, score_fn)}
    print(f"post-training: test score before {results['before']:.4f} on {len(test_pairs)} examples")
    order = list(range(len(train_pairs)))
    random.Random(cfg.seed).shuffle(order)
    model.train()
    for step in range(cfg.max_steps):
        batch = [train_pairs[order[(step * cfg.batch_size + i) % len(order)]] for i in range(cfg.batch_size)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        refine = None
        if cfg.objective == "refine":                                                   # 1. REFINE on the prompt
            ids, lengths = pad_batch([p["prompt_ids"] for p in batch], tok.pad_id, device)
            refine = train_step(model, opt, ids, cfg, step, 0, 1, True, lengths=lengths)
        full = [p["prompt_ids"] + p["answer_ids"] + [tok.eos_id] for p in batch]          # 2. SFT on the answer
        ids, lengths = pad_batch(full, tok.pad_id, device)
        answer = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
        for i, p in enumerate(batch):  # targets y[t] = ids[t + 1]: the answer and EOS follow the prompt
            answer[i, len(p["prompt_ids"]) - 1:len(full[i]) - 1] = True
        sft = train_step(model, opt, ids, cfg, step, 0, 1, False, target_mask=answer)
        if sft is None or (refine is None and cfg.objective == "refine"):
            print(f"warning: step {step + 1}: non-finite loss; step skipped")
            continue
        prompt = "" if refine is None else f"prompt ntp {refine['ntp_loss']:.4f} reward " \
            f"{torch.cat(refine['rewards']).mean().item():.3f} A·logp {refine['adv_logp']:+.4f} | "
        print(f"step {step + 1:5d} | {prompt}answer sft {sft['ntp_loss']:.4f}")
    results["after"] = score(model, tok, test_pairs, score_fn)
    print(f"post-training: test score after {results['after']:.4f}")
    return results


def test_time_train(cfg, model, opt, tok, device):
    examples, score_fn = load_pairs(cfg, tok, cfg.data, "test", cfg.eval_examples)
    res = ttt_evaluate(model, opt, examples, cfg, cfg.ttt_steps, tok, 32, score_fn, reset=cfg.ttt_reset,
                       generator=torch.Generator(device=device).manual_seed(cfg.seed))
    print(f"test-time training ({res['n']} examples, {cfg.ttt_steps} steps each, reset={cfg.ttt_reset}): "
          f"score without adaptation {res['base']:.4f}, with REFINE adaptation {res['adapted']:.4f}")
    return {k: res[k] for k in ("base", "adapted", "n")}


def run_phase(cfg, model, opt, tok, device):
    """train.py's entry for --phase post / ttt: runs it, saves results (and the post-trained model)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = (post_train if cfg.phase == "post" else test_time_train)(cfg, model, opt, tok, device)
    with open(os.path.join(cfg.out_dir, f"{cfg.phase}.json"), "w") as f:
        json.dump(results, f, indent=1)
    if cfg.phase == "post":
        save_pretrained(model, os.path.join(cfg.out_dir, "hf"), extra={"tokenizer": tok.name})
    return 0
