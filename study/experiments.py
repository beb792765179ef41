"""The experiments that reproduce.py adds to the main SFT-vs-REFINE comparison (issue 13), and their report sections.

  - refine-only: REFINE without the NTP term (lambda_SFT 0, lambda_RL 1): if NSP learns anything, its mean reward
    must rise over training (diagnose.reward_curve); it is evaluated like every run.
  - selection (--ablations): entropy (the main runs) vs uniform vs answer-aware selection (entropy.select_positions
    mode "answer": positions right before query-answer values), the same seeds, data and base.
  - a second toy where multi-token coherence matters: values of 3-6 words (answers of 3-6 tokens, where a
    free-running error early in the answer derails the rest and teacher-forced NTP never sees it), its own base,
    then SFT and REFINE from it, every seed; NIAH exact match (string_match_all) and teacher-forced answer accuracy.
  - post-training (--ablations): from the same base, the paper's nested loop (REFINE on the prompt, hybrid reward,
    lambda_RL 0.2, then SFT on the answer) vs SFT on the answers alone, the same steps and pairs, every seed.
  - optimiser steps per batch (--ablations): REFINE and SFT each with 4 PPO mini-batches per batch (4 AdamW steps),
    beside the main runs' 1 step per batch, every seed.
  - a frozen reward encoder (--ablations): the REFINE-only run with its cosine reward computed from the base's
    hidden states (--reward_encoder=frozen) instead of the policy's own.
Every run is train.py itself, launched by reproduce.py; this file only names the runs and writes the tables.
"""
import math

LONG_VALUES = (3, 6)
LONG_DATA = [f"--value_tokens={LONG_VALUES[0]}", f"--value_tokens_max={LONG_VALUES[1]}", "--doc_styles=S,MQ,MV",
             "--min_needles=1", "--n_needles=4"]
REFINE_ONLY = ["--lambda_sft=0", "--lambda_rl=1.0"]
SELECTION = {"refine-uniform": ["--select_mode=uniform"], "refine-answer": ["--select_mode=answer"]}
MINI_BATCHES = ["--ppo_mini_batch=4", "--micro_batch_size=4"]      # batch 16: 4 AdamW steps per batch
POST = ["--phase=post", "--reward=hybrid", "--lambda_rl=0.2", "--eval_examples=32"]   # the paper's post-training
VARIANTS = ("S", "MK", "MQ", "MV")


def extra_runs(args, seeds):
    """name -> (objective, seed, extra train.py flags, toy) of the runs beside the main comparison."""
    runs = {f"refine-only-s{seeds[0]}": ("refine", seeds[0], REFINE_ONLY + [f"--max_steps={args.refine_only_steps}"],
                                         "main")}
    runs.update({f"long-{obj}-s{s}": (obj, s, [f"--max_steps={args.long_steps}"], "long")
                 for obj in ("refine", "sft") for s in seeds})
    if args.ablations:
        runs.update({f"{name}-s{s}": ("refine", s, extra, "main") for name, extra in SELECTION.items() for s in seeds})
        runs.update({f"{obj}-mb4-s{s}": (obj, s, MINI_BATCHES, "main") for obj in ("refine", "sft") for s in seeds})
        runs.update({f"post-{obj}-s{s}": (obj, s, POST + [f"--max_steps={args.post_steps}"], "main")
                     for obj in ("refine", "sft") for s in seeds})
        runs[f"refine-only-frozen-s{seeds[0]}"] = ("refine", seeds[0], REFINE_ONLY + [
            f"--max_steps={args.refine_only_steps}", "--reward_encoder=frozen"], "main")
    return runs


def mean_se(xs):
    """Mean and standard error (sample sd / sqrt(n); 0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd / math.sqrt(len(xs))


def fmt(xs, scale=100.0, digits=1, sign=False):
    m, se = mean_se([scale * x for x in xs])
    return f"{m:{'+' if sign else ''}.{digits}f} ± {se:.{digits}f}"


def avg(run, prefix=""):
    cells = [c["mean"] for k, c in run["niah"].items() if k.startswith(prefix)]
    return sum(cells) / len(cells)


def comparison(runs, seeds, names, base_eval, keys):
    """Lines of a table: per NIAH setting, mean ± SE over seeds of each named objective, and (last - first) paired."""
    out = ["| setting | base | " + " | ".join(names.values()) + f" | {list(names.values())[-1]} − "
           f"{list(names.values())[0]} |", "|---|---|" + "---|" * (len(names) + 1)]
    for k in keys + ["average"]:
        get = (lambda r: avg(r)) if k == "average" else (lambda r, k=k: r["niah"][k]["mean"])
        cols = [[get(runs[f"{n}-s{s}"]) for s in seeds] for n in names]
        diff = [b - a for a, b in zip(cols[0], cols[-1])]
        out.append(f"| {k} | {100 * get(base_eval):.1f} | " + " | ".join(fmt(c) for c in cols) +
                   f" | {fmt(diff, sign=True)} |")
    return out


def verdict_line(diffs):
    m, se = mean_se(diffs)
    word = "better than" if m > 2 * se else "worse than" if m < -2 * se else "not distinguishable from"
    return m, se, word


def markdown(res):
    """The report sections of these experiments (a list of lines) for results.md."""
    a, runs, seeds = res["args"], res["runs"], res["seeds"]
    out = []
    if "diagnostics" in res:
        from study.diagnose import markdown as diag_md
        ro = f"refine-only-s{seeds[0]}"
        out += ["## 8. Why REFINE lands on SFT here: the REFINE signal", "",
                f"`{ro}`: REFINE without the NTP term (lambda_SFT 0, lambda_RL 1), {a['refine_only_steps']} steps "
                f"from the base, otherwise as the main REFINE runs. NIAH average {100 * avg(runs[ro]):.1f} (base "
                f"{100 * avg(res['base_eval']):.1f}, SFT seed {seeds[0]} {100 * avg(runs[f'sft-s{seeds[0]}']):.1f}); "
                f"validation loss {runs[ro]['val_loss']:.4f}.", ""]
        out += diag_md(res["diagnostics"], res["reward_curves"],
                       f"{a['diag_batches']} held-out batches of 16 documents at T={a['mid_seq_len']}, one draw each; "
                       f"gradients of the REFINE loss terms of the main runs, lambda_RL 0.2 x NSP and 1.0 x NTP")
    if a.get("ablations"):
        names = {"refine": "entropy", "refine-uniform": "uniform", "refine-answer": "answer"}
        out += ["## 9. Selection: entropy vs uniform vs answer-aware (REFINE, same seeds, base and documents)", "",
                "answer = entropy sampling restricted to the positions right before a query's answer values "
                "(entropy.py mode \"answer\"; 8 draws with replacement per document, start clamped to [8, L - k]). "
                "NIAH percent, mean ± standard error over seeds " + ", ".join(map(str, seeds)) + ".", "",
                "| selection | NIAH avg | MK avg | REFINE − SFT (paired) | val loss | answer loss | reward first → "
                "last 50 steps |", "|---|---|---|---|---|---|---|"]
        sft = [avg(runs[f"sft-s{s}"]) for s in seeds]
        for name, label in names.items():
            rs = [runs[f"{name}-s{s}"] for s in seeds]
            curves = [res["reward_curves"].get(f"{name}-s{s}") for s in seeds]
            rw = " / ".join(f"{c['first']:.3f} → {c['last']:.3f}" for c in curves if c)
            out.append(f"| {label} | {fmt([avg(r) for r in rs])} | {fmt([avg(r, 'MK@') for r in rs])} | "
                       f"{fmt([avg(r) - f for r, f in zip(rs, sft)], sign=True)} | "
                       f"{fmt([r['val_loss'] for r in rs], 1, 4)} | {fmt([r['answer_loss'] for r in rs], 1, 4)} | "
                       f"{rw} |")
        out.append(f"| SFT | {fmt(sft)} | {fmt([avg(runs[f'sft-s{s}'], 'MK@') for s in seeds])} | - | "
                   f"{fmt([runs[f'sft-s{s}']['val_loss'] for s in seeds], 1, 4)} | "
                   f"{fmt([runs[f'sft-s{s}']['answer_loss'] for s in seeds], 1, 4)} | - |")
        out.append("")
    if "long_base" in res:
        lb, lengths = res["long_base"], res["long_lengths"]
        keys = [f"{v}@{n}" for v in VARIANTS for n in lengths]
        diffs = [100 * (avg(runs[f"long-refine-s{s}"]) - avg(runs[f"long-sft-s{s}"])) for s in seeds]
        m, se, word = verdict_line(diffs)
        out += [f"## 10. A second toy where multi-token answers matter: values of {LONG_VALUES[0]}-{LONG_VALUES[1]} "
                "words", "",
                f"Same grammar, model and recipe, but every needle value has {LONG_VALUES[0]}-{LONG_VALUES[1]} words "
                "(drawn per value), so an answer is 3-6 tokens (MQ/MV: up to 4 such values) and exact match needs "
                "every token right in free-running generation, where one early error derails the rest; teacher-"
                "forced NTP always conditions on the true previous words. Its base continues the main base (a "
                "curriculum: 2-word values first) with the same pretraining recipe on 3-6-word values at T=64, "
                f"checked every {a['base_check']} steps and stopped at {a['base_metric']} >= "
                f"{100 * lb['threshold']:.0f}% (NIAH@256) or after {a['long_base_max']} steps: **{lb['steps']} steps**"
                + ("" if lb["reached"] else " (the threshold was NOT reached)") + f". Then {a['long_steps']} "
                f"mid-training steps (the main toy: {a['mid_steps']}; fewer to fit the time budget) at "
                f"T={a['mid_seq_len']}, SFT and REFINE (c=8, k=5, entropy, cosine, lambda_RL 0.2), seeds "
                f"{', '.join(map(str, seeds))}; {a['n_eval']} prompts per setting.", "",
                "Base recall checks (NIAH@256, percent): " + ", ".join(
                    f"step {h['step']}: " + "/".join(f"{100 * h[v]:.0f}" for v in VARIANTS) for h in lb["history"][-4:])
                + " (S/MK/MQ/MV).", "",
                "NIAH percent, mean ± standard error over seeds (REFINE − SFT paired by seed):", ""]
        out += comparison(runs, seeds, {"long-sft": "SFT", "long-refine": "REFINE"}, res["long_base_eval"], keys)
        out += ["", "| model | val loss | answer-value loss | teacher-forced answer-token accuracy |",
                "|---|---|---|---|",
                f"| base | {res['long_base_eval']['val_loss']:.4f} | {res['long_base_eval']['answer_loss']:.4f} | "
                f"{res['long_base_eval']['answer_acc']:.4f} |"]
        for obj in ("sft", "refine"):
            rs = [runs[f"long-{obj}-s{s}"] for s in seeds]
            out.append(f"| {obj.upper()} | " + " | ".join(fmt([r[k] for r in rs], 1, 4)
                                                         for k in ("val_loss", "answer_loss", "answer_acc")) + " |")
        out += ["", "Verdict on this toy: average NIAH REFINE − SFT per seed " +
                ", ".join(f"{d:+.1f}" for d in diffs) + f" points; mean {m:+.1f} ± {se:.1f} (standard error over "
                f"seeds): REFINE is **{word}** SFT (threshold: 2 standard errors).", ""]
    if f"post-sft-s{seeds[0]}" in runs:
        out += post_training(res) + steps_per_batch(res) + frozen_encoder(res)
    return out


def paired(runs, seeds, a, b):
    """Average NIAH of run a minus run b, per seed (points) -> (diffs, mean, SE, verdict word)."""
    diffs = [100 * (avg(runs[f"{a}-s{s}"]) - avg(runs[f"{b}-s{s}"])) for s in seeds]
    return (diffs, *verdict_line(diffs))


def post_training(res):
    a, runs, seeds = res["args"], res["runs"], res["seeds"]
    diffs, m, se, word = paired(runs, seeds, "post-refine", "post-sft")
    out = ["## 11. Post-training: nested REFINE vs SFT on the answers alone", "",
           f"From the main base, {a['post_steps']} steps of {a['mid_batch']} toy prompt/answer pairs: NIAH prompts of "
           f"T={a['mid_seq_len']} (S/MK/MQ/MV in turn) whose answers are the needle values, from the training stream "
           "(disjoint from every evaluation prompt). SFT-only: the answer loss alone. Nested REFINE (phases.py, the "
           "paper's post-training): per batch one REFINE step on the prompts (hybrid reward, lambda_RL 0.2, c=8, "
           "k=5), then the same SFT step on the answers, one AdamW state. Scored on the held-out NIAH prompts of "
           f"section 2 ({a['n_eval']} per setting); percent, mean ± standard error over seeds, nested REFINE − "
           "SFT-only paired by seed:", ""]
    keys = [f"{v}@{n}" for v in VARIANTS for n in res["lengths"]]
    out += comparison(runs, seeds, {"post-sft": "SFT-only", "post-refine": "nested REFINE"}, res["base_eval"], keys)
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return out + ["", f"Verdict: average NIAH nested REFINE − SFT-only per seed {per_seed} points; mean {m:+.1f} ± "
                  f"{se:.1f}: nested REFINE is **{word}** SFT-only (threshold: 2 standard errors).", ""]


def steps_per_batch(res):
    runs, seeds, n = res["runs"], res["seeds"], res["args"]["mid_batch"] // 4
    names = {"sft": "SFT, 1 AdamW step per batch (section 2)", "sft-mb4": f"SFT, {n} AdamW steps per batch",
             "refine": "REFINE, 1 step per batch (section 2)", "refine-mb4": f"REFINE, {n} steps per batch"}
    out = ["## 12. Optimiser steps per batch", "",
           "With PPO mini-batches a REFINE batch gets one AdamW step per mini-batch; an SFT baseline stepped once per "
           f"batch then takes fewer, larger steps. The main runs (batch {res['args']['mid_batch']}) against the same "
           f"runs with --ppo_mini_batch=4 ({n} AdamW steps per batch, for SFT too), same documents, seeds " +
           ", ".join(map(str, seeds)) + "; NIAH percent, mean ± standard error over seeds:", "",
           "| run | NIAH avg | MK avg | val loss | answer loss |", "|---|---|---|---|---|"]
    for name, label in names.items():
        rs = [runs[f"{name}-s{s}"] for s in seeds]
        out.append(f"| {label} | {fmt([avg(r) for r in rs])} | {fmt([avg(r, 'MK@') for r in rs])} | "
                   f"{fmt([r['val_loss'] for r in rs], 1, 4)} | {fmt([r['answer_loss'] for r in rs], 1, 4)} |")
    out += ["", "| paired by seed (average NIAH, points) | per seed | mean ± SE | verdict |", "|---|---|---|---|"]
    for a, b, label in (("refine-mb4", "sft-mb4", f"REFINE − SFT, both {n} steps per batch"),
                        ("refine", "sft", "REFINE − SFT, both 1 step per batch"),
                        ("refine-mb4", "sft", f"REFINE {n} steps − SFT 1 step (PPO mini-batches, SFT not)"),
                        ("sft-mb4", "sft", f"SFT {n} steps − SFT 1 step")):
        diffs, m, se, word = paired(runs, seeds, a, b)
        out.append(f"| {label} | {', '.join(f'{d:+.1f}' for d in diffs)} | {m:+.1f} ± {se:.1f} | {word} |")
    return out + [""]


def frozen_encoder(res):
    a, runs, curves, s0 = res["args"], res["runs"], res["reward_curves"], res["seeds"][0]
    out = ["## 13. REFINE-only with a frozen reward encoder", "",
           f"The REFINE-only run of section 8 ({a['refine_only_steps']} steps, lambda_SFT 0) computes its cosine "
           "reward from the policy's own hidden states, so the policy can raise it by moving its representations. "
           "The same run with the reward computed from the base's hidden states (--reward_encoder=frozen: a frozen "
           f"copy of the starting weights encodes both the rollout and the true continuation), seed {s0}:", "",
           "| reward encoder | mean reward, first → last 50 steps | NIAH avg | MK avg | val loss |",
           "|---|---|---|---|---|"]
    for name, label in ((f"refine-only-s{s0}", "the policy (default)"), (f"refine-only-frozen-s{s0}", "frozen base")):
        r, c = runs[name], curves.get(name)
        rw = f"{c['first']:.3f} → {c['last']:.3f}" if c else "-"
        out.append(f"| {label} | {rw} | {100 * avg(r):.1f} | {100 * avg(r, 'MK@'):.1f} | {r['val_loss']:.4f} |")
    return out + ["", f"The base: NIAH avg {100 * avg(res['base_eval']):.1f}, MK avg "
                  f"{100 * avg(res['base_eval'], 'MK@'):.1f}, val loss {res['base_eval']['val_loss']:.4f}.", ""]
