"""The experiments that reproduce.py adds to the main SFT-vs-REFINE comparison (issue 13), and their report sections.

  - refine-only: REFINE without the NTP term (lambda_SFT 0, lambda_RL 1): if NSP learns anything, its mean reward
    must rise over training (diagnose.reward_curve); it is evaluated like every run.
  - selection (--ablations): entropy (the main runs) vs uniform vs answer-aware selection (entropy.select_positions
    mode "answer": positions right before query-answer values), the same data and base, the first
    --selection_seeds seeds.
  - a second toy where multi-token coherence matters: values of 3-6 words (answers of 3-6 tokens, where a
    free-running error early in the answer derails the rest and teacher-forced NTP never sees it), its own base,
    then SFT and REFINE from it, every seed; NIAH exact match (string_match_all) and teacher-forced answer accuracy.
  - post-training (--ablations): from the same base, the paper's nested loop (REFINE on the prompt, hybrid reward,
    lambda_RL 0.2, then SFT on the answer) vs the same nested loop with lambda_RL 0 (NTP on the prompt, then SFT on
    the answer: the same two AdamW steps per batch and the same tokens, the control that isolates NSP), and SFT on
    the answers alone (one step per batch), the same pairs, every seed.
  - optimiser steps per batch (--ablations): REFINE and SFT each with 4 PPO mini-batches per batch (4 AdamW steps),
    beside the main runs' 1 step per batch, every seed.
  - a frozen reward encoder (--ablations): the REFINE-only run with its cosine reward computed from the base's
    hidden states (--reward_encoder=frozen) instead of the policy's own.
Every run is train.py itself, launched by reproduce.py; this file only names the runs and writes the tables. Every
verdict is study/verdict.py's paired() (the one rule).
"""
from study.verdict import interval, mean_sd, paired, per_unit

LONG_VALUES = (3, 6)
LONG_DATA = [f"--value_tokens={LONG_VALUES[0]}", f"--value_tokens_max={LONG_VALUES[1]}", "--doc_styles=S,MQ,MV",
             "--min_needles=1", "--n_needles=4"]
REFINE_ONLY = ["--lambda_sft=0", "--lambda_rl=1.0"]
SELECTION = {"refine-uniform": ["--select_mode=uniform"], "refine-answer": ["--select_mode=answer"]}
MINI_BATCHES = ["--ppo_mini_batch=4", "--micro_batch_size=4"]      # batch 16: 4 AdamW steps per batch
POST = ["--phase=post", "--reward=hybrid", "--eval_examples=32"]   # the paper's post-training (lambda_RL 0.2)
POST_RUNS = {"post-sft": ("sft", []), "post-lambda0": ("refine", ["--lambda_rl=0"]), "post-refine": ("refine", [])}
VARIANTS = ("S", "MK", "MQ", "MV")


def extra_runs(args, seeds):
    """name -> (objective, seed, extra train.py flags, toy) of the runs beside the main comparison."""
    runs = {f"refine-only-s{seeds[0]}": ("refine", seeds[0], REFINE_ONLY + [f"--max_steps={args.refine_only_steps}"],
                                         "main")}
    runs.update({f"long-{obj}-s{s}": (obj, s, [f"--max_steps={args.long_steps}"], "long")
                 for obj in ("refine", "sft") for s in seeds})
    if args.ablations:
        runs.update({f"{name}-s{s}": ("refine", s, extra, "main") for name, extra in SELECTION.items()
                     for s in seeds[:args.selection_seeds]})
        runs.update({f"{obj}-mb4-s{s}": (obj, s, MINI_BATCHES, "main") for obj in ("refine", "sft") for s in seeds})
        runs.update({f"{name}-s{s}": (obj, s, POST + extra + [f"--max_steps={args.post_steps}"], "main")
                     for name, (obj, extra) in POST_RUNS.items() for s in seeds})
        runs[f"refine-only-frozen-s{seeds[0]}"] = ("refine", seeds[0], REFINE_ONLY + [
            f"--max_steps={args.refine_only_steps}", "--reward_encoder=frozen"], "main")
    return runs


def fmt(xs, scale=100.0, digits=1):
    """'mean ± sd' of xs (scaled: percent by default)."""
    return "{:.{d}f} ± {:.{d}f}".format(*mean_sd([scale * x for x in xs]), d=digits)


def avg(run, prefix=""):
    cells = [c["mean"] for k, c in run["niah"].items() if k.startswith(prefix)]
    return sum(cells) / len(cells)


def compare(runs, seeds, a, b, prefix=""):
    """The verdict on run a vs run b: average NIAH (of the settings starting with prefix) a - b per seed, points."""
    return paired([100 * (avg(runs[f"{a}-s{s}"], prefix) - avg(runs[f"{b}-s{s}"], prefix)) for s in seeds])


def comparison(runs, seeds, names, base_eval, keys, pairs):
    """Lines of a table: per NIAH setting, mean ± sd over seeds of each named run, and per (a, b) of pairs the
    difference a - b paired by seed, its mean and 95% interval."""
    out = ["| setting | base | " + " | ".join(f"{n}, mean ± sd" for n in names.values()) + " | " +
           " | ".join(f"{names[a]} − {names[b]}, mean [95% interval]" for a, b in pairs) + " |",
           "|---|---|" + "---|" * (len(names) + len(pairs))]
    for k in keys + ["average"]:
        get = (lambda r: avg(r)) if k == "average" else (lambda r, k=k: r["niah"][k]["mean"])
        cols = {n: [get(runs[f"{n}-s{s}"]) for s in seeds] for n in names}
        diffs = [paired([100 * (x - y) for x, y in zip(cols[a], cols[b])]) for a, b in pairs]
        out.append(f"| {k} | {100 * get(base_eval):.1f} | " + " | ".join(fmt(c) for c in cols.values()) + " | " +
                   " | ".join(interval(d) for d in diffs) + " |")
    return out


def verdict_sentence(v, a, b, unit="seed"):
    """'per seed +1.0, ...; mean +0.9 [95% interval -0.2, +2.0]: a is **not distinguishable from** b.'"""
    spread = f"95% interval [{v['low']:+.1f}, {v['high']:+.1f}] (t, {v['n'] - 1} degrees of freedom)" if v["n"] > 1 \
        else f"no interval from one {unit}"
    return f"per {unit} {per_unit(v)} points; mean {v['mean']:+.1f}, {spread}: {a} is **{v['word']}** {b}."


def selection_seeds(res):
    """The seeds of the selection runs (the first --selection_seeds of the study's seeds)."""
    return [s for s in res["seeds"] if f"refine-uniform-s{s}" in res["runs"]]


def markdown(res):
    """The report sections of these experiments (a list of lines) for results.md."""
    a, runs, seeds = res["args"], res["runs"], res["seeds"]
    out = []
    if "diagnostics" in res:
        from study.diagnose import markdown as diag_md
        ro = f"refine-only-s{seeds[0]}"
        out += ["## 8. The REFINE signal: REFINE without the NTP term, and where its positions fall", "",
                f"`{ro}`: REFINE without the NTP term (lambda_SFT 0, lambda_RL 1), {a['refine_only_steps']} steps "
                f"from the base, otherwise as the main REFINE runs. NIAH average {100 * avg(runs[ro]):.1f} (base "
                f"{100 * avg(res['base_eval']):.1f}, SFT seed {seeds[0]} {100 * avg(runs[f'sft-s{seeds[0]}']):.1f}); "
                f"validation loss {runs[ro]['val_loss']:.4f}.", ""]
        out += diag_md(res["diagnostics"], res["reward_curves"],
                       f"{a['diag_batches']} held-out batches of 16 documents at T={a['mid_seq_len']}, one draw each; "
                       f"gradients of the REFINE loss terms of the main runs, lambda_RL 0.2 x NSP and 1.0 x NTP")
    sel = selection_seeds(res)
    if sel:
        out += selection(res, sel)
    if "long_base" in res:
        out += second_toy(res)
    if f"post-sft-s{seeds[0]}" in runs:
        out += post_training(res) + steps_per_batch(res) + frozen_encoder(res)
    return out


def selection(res, seeds):
    runs = res["runs"]
    names = {"refine": "entropy", "refine-uniform": "uniform", "refine-answer": "answer"}
    out = ["## 9. Selection: entropy vs uniform vs answer-aware (REFINE, same seeds, base and documents)", "",
           "answer = entropy sampling restricted to the positions right before a query's answer values "
           "(entropy.py mode \"answer\"; 8 draws with replacement per document, start clamped to [8, L - k]). "
           "NIAH percent over seeds " + ", ".join(map(str, seeds)) + "; levels mean ± sd over seeds, REFINE − SFT "
           "paired by seed with its 95% interval and verdict.", "",
           "| selection | NIAH avg, mean ± sd | MK avg, mean ± sd | REFINE − SFT, mean [95% interval]: verdict | "
           "val loss, mean ± sd | answer loss, mean ± sd | reward first → last 50 steps (per seed) |",
           "|---|---|---|---|---|---|---|"]
    for name, label in names.items():
        rs = [runs[f"{name}-s{s}"] for s in seeds]
        curves = [res["reward_curves"].get(f"{name}-s{s}") for s in seeds]
        rw = " / ".join(f"{c['first']:.3f} → {c['last']:.3f}" for c in curves if c)
        v = compare(runs, seeds, name, "sft")
        out.append(f"| {label} | {fmt([avg(r) for r in rs])} | {fmt([avg(r, 'MK@') for r in rs])} | "
                   f"{interval(v)}: {v['word']} SFT | {fmt([r['val_loss'] for r in rs], 1, 4)} | "
                   f"{fmt([r['answer_loss'] for r in rs], 1, 4)} | {rw} |")
    sft = [runs[f"sft-s{s}"] for s in seeds]
    out.append(f"| SFT | {fmt([avg(r) for r in sft])} | {fmt([avg(r, 'MK@') for r in sft])} | - | "
               f"{fmt([r['val_loss'] for r in sft], 1, 4)} | {fmt([r['answer_loss'] for r in sft], 1, 4)} | - |")
    return out + [""]


def second_toy(res):
    a, runs, seeds, lb, lengths = res["args"], res["runs"], res["seeds"], res["long_base"], res["long_lengths"]
    keys = [f"{v}@{n}" for v in VARIANTS for n in lengths]
    v = compare(runs, seeds, "long-refine", "long-sft")
    out = [f"## 10. A second toy where multi-token answers matter: values of {LONG_VALUES[0]}-{LONG_VALUES[1]} "
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
               f"step {h['step']}: " + "/".join(f"{100 * h[x]:.0f}" for x in VARIANTS) for h in lb["history"][-4:])
           + " (S/MK/MQ/MV).", "", "NIAH percent (REFINE − SFT paired by seed):", ""]
    out += comparison(runs, seeds, {"long-sft": "SFT", "long-refine": "REFINE"}, res["long_base_eval"], keys,
                      [("long-refine", "long-sft")])
    out += ["", "| model | val loss, mean ± sd | answer-value loss, mean ± sd | teacher-forced answer-token "
            "accuracy, mean ± sd |", "|---|---|---|---|",
            f"| base | {res['long_base_eval']['val_loss']:.4f} | {res['long_base_eval']['answer_loss']:.4f} | "
            f"{res['long_base_eval']['answer_acc']:.4f} |"]
    for obj in ("sft", "refine"):
        rs = [runs[f"long-{obj}-s{s}"] for s in seeds]
        out.append(f"| {obj.upper()} | " + " | ".join(fmt([r[k] for r in rs], 1, 4)
                                                     for k in ("val_loss", "answer_loss", "answer_acc")) + " |")
    return out + ["", "Verdict on this toy, average NIAH REFINE − SFT " + verdict_sentence(v, "REFINE", "SFT"), ""]


def post_training(res):
    a, runs, seeds = res["args"], res["runs"], res["seeds"]
    names = {"post-sft": "SFT-only", "post-lambda0": "nested, lambda_RL 0", "post-refine": "nested REFINE"}
    names = {k: n for k, n in names.items() if f"{k}-s{seeds[0]}" in runs}   # results of before the control: 2
    pairs = [p for p in (("post-refine", "post-lambda0"), ("post-refine", "post-sft"), ("post-lambda0", "post-sft"))
             if p[0] in names and p[1] in names]
    out = ["## 11. Post-training: nested REFINE vs the same nested loop without NSP, and SFT on the answers alone", "",
           f"From the main base, {a['post_steps']} steps of {a['mid_batch']} toy prompt/answer pairs: NIAH prompts of "
           f"T={a['mid_seq_len']} (S/MK/MQ/MV in turn) whose answers are the needle values, from the training stream "
           "(disjoint from every evaluation prompt). Nested REFINE (phases.py, the paper's post-training): per batch "
           "one REFINE step on the prompts (NTP + 0.2 x NSP, hybrid reward, c=8, k=5), then one SFT step on the "
           "answers, one AdamW state. Nested with lambda_RL 0 (the control that isolates NSP): the same loop, the "
           "same two AdamW steps per batch on the same tokens, but the prompt step is NTP alone. SFT-only: the "
           "answer step alone (one step per batch; it never sees prompt text as a target). Scored on the held-out "
           f"NIAH prompts of section 2 ({a['n_eval']} per setting); percent:", ""]
    if "post-lambda0" not in names:
        out[-2] += (" **These results predate the lambda_RL 0 control: SFT-only is the only comparison, and it is not "
                    "a controlled one.**")
    keys = [f"{v}@{n}" for v in VARIANTS for n in res["lengths"]]
    out += comparison(runs, seeds, names, res["base_eval"], keys, pairs)
    out += ["", "| run | val loss, mean ± sd | answer-value loss, mean ± sd |", "|---|---|---|",
            f"| base | {res['base_eval']['val_loss']:.4f} | {res['base_eval']['answer_loss']:.4f} |"]
    for name, label in names.items():
        rs = [runs[f"{name}-s{s}"] for s in seeds]
        out.append(f"| {label} | {fmt([r['val_loss'] for r in rs], 1, 4)} | "
                   f"{fmt([r['answer_loss'] for r in rs], 1, 4)} |")
    out.append("")
    for x, y in pairs:
        out.append(f"Verdict, average NIAH {names[x]} − {names[y]} " +
                   verdict_sentence(compare(runs, seeds, x, y), names[x], names[y]))
        out.append("")
    return out


def steps_per_batch(res):
    runs, seeds, n = res["runs"], res["seeds"], res["args"]["mid_batch"] // 4
    names = {"sft": "SFT, 1 AdamW step per batch (section 2)", "sft-mb4": f"SFT, {n} AdamW steps per batch",
             "refine": "REFINE, 1 step per batch (section 2)", "refine-mb4": f"REFINE, {n} steps per batch"}
    out = ["## 12. Optimiser steps per batch", "",
           "With PPO mini-batches a REFINE batch gets one AdamW step per mini-batch; an SFT baseline stepped once per "
           f"batch then takes fewer, larger steps. The main runs (batch {res['args']['mid_batch']}) against the same "
           f"runs with --ppo_mini_batch=4 ({n} AdamW steps per batch, for SFT too), same documents, seeds " +
           ", ".join(map(str, seeds)) + "; NIAH percent:", "",
           "| run | NIAH avg, mean ± sd | MK avg, mean ± sd | val loss, mean ± sd | answer loss, mean ± sd |",
           "|---|---|---|---|---|"]
    for name, label in names.items():
        rs = [runs[f"{name}-s{s}"] for s in seeds]
        out.append(f"| {label} | {fmt([avg(r) for r in rs])} | {fmt([avg(r, 'MK@') for r in rs])} | "
                   f"{fmt([r['val_loss'] for r in rs], 1, 4)} | {fmt([r['answer_loss'] for r in rs], 1, 4)} |")
    out += ["", "| paired by seed (average NIAH, points) | per seed | mean [95% interval] | verdict |",
            "|---|---|---|---|"]
    for a, b, label in (("refine-mb4", "sft-mb4", f"REFINE − SFT, both {n} steps per batch"),
                        ("refine", "sft", "REFINE − SFT, both 1 step per batch"),
                        ("refine-mb4", "sft", f"REFINE {n} steps − SFT 1 step (PPO mini-batches, SFT not)"),
                        ("sft-mb4", "sft", f"SFT {n} steps − SFT 1 step")):
        v = compare(runs, seeds, a, b)
        first, second = label.split(" − ")[0].split(",")[0], label.split(" − ")[1].split(",")[0].split(" (")[0]
        out.append(f"| {label} | {per_unit(v)} | {interval(v)} | {first} is {v['word']} {second} |")
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
