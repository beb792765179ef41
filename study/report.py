"""The report of reproduce.py: the statistics (mean, standard error; every verdict from study/verdict.py), results.md,
niah.png, curves.png and the README's short summary between the toy-results markers. Tensors never reach this file:
it reads the result dicts that reproduce.py collects (results.json)."""
import math
from pathlib import Path

from study import experiments
from study.verdict import RULE, interval, mean_sd, paired

VARIANTS = ("S", "MK", "MQ", "MV")


def summary(scores):
    """Mean and standard error of per-prompt scores -> dict(mean, se, n)."""
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    return dict(mean=mean, se=sd / math.sqrt(n), n=n)


def cell(xs):
    m, sd = mean_sd([100 * x for x in xs])
    return f"{m:.1f} ± {sd:.1f}" if len(xs) > 1 else f"{m:.1f}"


def run_avg(result):
    """Mean NIAH over every variant@length of one run, and its standard error from the prompts."""
    cells = list(result["niah"].values())
    return (sum(c["mean"] for c in cells) / len(cells), math.sqrt(sum(c["se"] ** 2 for c in cells)) / len(cells))


def verdict(res):
    """REFINE - SFT on the average NIAH, paired by seed (same base, same documents, same seed): verdict.paired."""
    return experiments.compare(res["runs"], res["seeds"], "refine", "sft")


def markdown(res):
    a, runs, seeds, L = res["args"], res["runs"], res["seeds"], res["lengths"]
    keys = [f"{v}@{n}" for v in VARIANTS for n in L]
    ver = verdict(res)
    n_eval = a["n_eval"]
    out = [f"# Toy reproduction: REFINE vs SFT mid-training, and test-time training ({a['model']}, CPU)", "",
           f"Produced by `{res['command']}` in {res['wall_s']['total'] / 60:.1f} min on {res['cpus']} CPU cores "
           f"({res['versions']}). Every number is measured by that command; results.json holds them all.", "",
           "## Setup", "",
           "- Data: the synthetic grammar of data.py, word-level tokenizer (one token per word), needles "
           "\"The code for K is V1 V2 .\" with 2-token values; training documents hold 1-4 needles and end with "
           "queries for all of them in the styles S, MQ, MV (answers predictable from context).",
           f"- Base: NTP at T=64, batch 64, AdamW lr 3e-3 (50 warm-up steps), betas (0.9, 0.98), wd 0.1, answer "
           f"values weighted 11x; a recall check (NIAH@256 of S/MK/MQ/MV, {a['base_eval']} prompts each) every "
           f"{a['base_check']} steps; stopped at the first check with {a['base_metric']} >= "
           f"{100 * a['base_threshold']:.0f}%: **{res['base']['steps']} steps**" +
           ("" if res["base"]["reached"] else " (the threshold was NOT reached: --base_max)") + ".",
           f"- Mid-training from the base: {a['mid_steps']} steps at T={a['mid_seq_len']}, batch {a['mid_batch']}, "
           f"lr {a['mid_lr']} cosine (20 warm-up), plain NTP loss; SFT = objective sft; REFINE = NTP + 0.2 x NSP "
           f"(c=8, k=5, n=1, entropy selection, cosine reward, GRPO). Seeds {a['seeds']} (a seed fixes the "
           f"document stream and the rollouts; SFT and REFINE of one seed see the same documents).",
           f"- Evaluation: RULER-style NIAH with 4 needles for MK/MQ/MV, greedy answers, string_match_all (exact "
           f"match for S and MK), {n_eval} held-out prompts per variant and length (standard error of one cell "
           f"<= {50 / math.sqrt(n_eval):.1f} points); validation on {a['val_batches'] * 16} held-out documents.", "",
           "Why this setup (from short probes run while choosing it, not by this command): with plain NTP the "
           "base learned no recall within ~1,100 steps at T=64, so pretraining weights answer values 11x (plain "
           "NTP again in mid-training, for both objectives); recall of S appears first and is mere copying (with "
           "4 needles the model first returns SOME needle's value: MK stays near or below the 25% of a random "
           "pick), and key-value binding (MK) appears a few hundred steps later. The check therefore stops on MK, "
           "the variant that needs binding, so the base recalls partially in the sense that matters and both "
           "gains and losses remain visible (S is already at ceiling; only losses can show there).", "",
           "## 1. Base: partial recall", "", "Recall checks during pretraining (NIAH@256, percent):", "",
           "| step | S | MK | MQ | MV | mean |", "|---|---|---|---|---|---|"]
    out += [f"| {h['step']} | " + " | ".join(f"{100 * h[v]:.0f}" for v in VARIANTS) + f" | {100 * h['mean']:.1f} |"
            for h in res["base"]["history"]]
    out += ["", "## 2. Mid-training: NIAH (percent; REFINE − SFT paired by seed)", ""]
    out += experiments.comparison(runs, seeds, {"sft": "SFT", "refine": "REFINE"}, res["base_eval"], keys,
                                  [("refine", "sft")])
    out += ["", "## 3. Validation (held-out documents, T=%d)" % a["mid_seq_len"], "",
            "| model | NTP loss, mean ± sd | next-token acc, mean ± sd | answer-value loss, mean ± sd |",
            "|---|---|---|---|",
            f"| base | {res['base_eval']['val_loss']:.4f} | {res['base_eval']['val_acc']:.4f} | "
            f"{res['base_eval']['answer_loss']:.4f} |"]
    for obj in ("sft", "refine"):
        rs = [runs[f"{obj}-s{s}"] for s in seeds]
        out.append(f"| {obj.upper()} | " + " | ".join(
            "{:.4f} ± {:.4f}".format(*mean_sd([r[m] for r in rs])) for m in ("val_loss", "val_acc", "answer_loss"))
            + " |")
    out += ["", "## 4. Every run", "", "| run | NIAH avg | ± SE (prompts) | val loss | answer loss | train s |",
            "|---|---|---|---|---|---|"]
    for name, r in sorted(runs.items()):
        m, se = run_avg(r)
        out.append(f"| {name} | {100 * m:.1f} | {100 * se:.1f} | {r['val_loss']:.4f} | {r['answer_loss']:.4f} | "
                   f"{r['train_s']:.0f} |")
    out += ["", f"## 5. Test-time training of the base ({a['n_ttt']} held-out prompts per variant at "
            f"{min(256, max(L))} tokens, {a['ttt_steps']} AdamW steps at lr {a['ttt_lr']} on each prompt, reset "
            f"after each; percent)", "",
            "| variant | no adaptation, mean ± SE (prompts) | NTP only (lambda_RL 0), mean ± SE | REFINE (binary, "
            "lambda_RL 0.4), mean ± SE | REFINE − NTP paired by prompt, mean [95% interval]: verdict |",
            "|---|---|---|---|---|"]
    ttt = res["ttt"]
    for v in VARIANTS + ("all",):
        pick = (lambda c, k: [x for u in VARIANTS for x in ttt[c]["per_variant"][u][k]]) if v == "all" else \
            (lambda c, k, v=v: ttt[c]["per_variant"][v][k])
        none, ntp, ref = pick("ntp", "none"), pick("ntp", "adapted"), pick("refine", "adapted")
        s = [summary(x) for x in (none, ntp, ref)]
        d = paired([100 * (r - n) for r, n in zip(ref, ntp)])
        out.append(f"| {v} | " + " | ".join(f"{100 * x['mean']:.1f} ± {100 * x['se']:.1f}" for x in s) +
                   f" | {interval(d)}: {d['word']} NTP only |")
    out += ["", "## 6. Verdict", "",
            f"The rule, for this section and every other verdict of this report: {RULE}. The prompts are the same "
            "for every seed, so the interval covers the seeds' spread, not the draw of the prompts (section 4 gives "
            "each run's prompt standard error).", "",
            f"Average NIAH over the {len(keys)} settings, REFINE − SFT "
            + experiments.verdict_sentence(ver, "REFINE mid-training", "SFT at this toy scale")
            + f" {sum(d > 0 for d in ver['diffs'])} of {len(ver['diffs'])} seeds favour REFINE.", "",
            "![NIAH](niah.png)", "", "![curves](curves.png)", ""]
    if res.get("ablations"):
        s0 = seeds[0]
        out += [f"## 7. Ablations (REFINE variants, seed {s0}; compare with refine-s{s0} and sft-s{s0})", "",
                "| run | change | NIAH avg | MK avg | val loss | answer loss |", "|---|---|---|---|---|---|"]
        for name in [f"sft-s{s0}", f"refine-s{s0}"] + sorted(res["ablations"]):
            r = runs[name]
            mk = [c["mean"] for k, c in r["niah"].items() if k.startswith("MK@")]
            out.append(f"| {name} | {' '.join(res['ablations'].get(name, [])) or '-'} | {100 * run_avg(r)[0]:.1f} | "
                       f"{100 * sum(mk) / len(mk):.1f} | {r['val_loss']:.4f} | {r['answer_loss']:.4f} |")
        out.append("")
    out += experiments.markdown(res)
    out += ["## Wall time", "",
            f"This invocation: base pretraining of both toys {res['wall_s']['base']:.0f} s" +
            (" (reused: the time of the invocations that made them)" if res["base"].get("reused") else "") +
            f", runs and evaluations {res['wall_s']['runs_and_evals']:.0f} s ({a['jobs']} at a time), REFINE "
            f"diagnostics {res['wall_s'].get('diagnostics', 0):.0f} s, total "
            f"{res['wall_s']['total']:.0f} s; runs reused from an earlier invocation with the same settings: "
            f"{', '.join(res['reused']) or 'none'}.", "",
            "Invocations in this --out_dir (the log of what each one computed):", "",
            "| command | total s | base reused | runs reused |", "|---|---|---|---|"]
    out += [f"| `{i['command']}` | {i['total_s']:.0f} | {'yes' if i['base_reused'] else 'no'} | "
            f"{len(i['runs_reused'])} of {len(i['runs'])} |" for i in res.get("invocations", [])]
    return "\n".join(out) + "\n"


def smooth(xs, w=25):
    xs = [x for x in xs if x is not None]
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # headless
    import matplotlib.pyplot as plt
    return plt


def plot_niah(res, path):
    """niah.png: NIAH accuracy per variant over the context lengths, base, SFT and REFINE (mean over seeds, error
    bars one standard deviation over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(12, 3.4), sharey=True)
    L = res["lengths"]
    for ax, v in zip(axes, VARIANTS):
        ax.plot(L, [100 * res["base_eval"]["niah"][f"{v}@{n}"]["mean"] for n in L], "k--", lw=1, label="base")
        for obj, color, label in (("sft", "tab:blue", "SFT"), ("refine", "tab:orange", "REFINE")):
            stats = [mean_sd([100 * res["runs"][f"{obj}-s{s}"]["niah"][f"{v}@{n}"]["mean"] for s in res["seeds"]])
                     for n in L]
            ax.errorbar(L, [m for m, _ in stats], yerr=[sd for _, sd in stats], color=color, marker="o", ms=4,
                        capsize=3, label=label)
        ax.set(title=v, xscale="log", xlabel="context length (tokens)")
        ax.set_xticks(L, [str(n) for n in L])
        ax.minorticks_off()
    axes[0].set_ylabel("NIAH accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy mid-training: NIAH of SFT vs REFINE ({len(res['seeds'])} seeds, error bars: sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(res, path):
    """curves.png: the mid-training NTP loss and mean reward over the steps of the SFT and REFINE runs (moving
    average of 25 steps, one line per seed), and the reward of the REFINE-only run."""
    plt = _pyplot()
    fig, (loss_ax, reward_ax) = plt.subplots(1, 2, figsize=(12, 3.6))
    tails = []
    for obj, color, label in (("sft", "tab:blue", "SFT"), ("refine", "tab:orange", "REFINE")):
        for i, s in enumerate(res["seeds"]):
            c = res["curves"][f"{obj}-s{s}"]
            ntp = smooth(c["ntp_loss"])
            tails += ntp[len(ntp) // 5:]
            loss_ax.plot(c["step"], ntp, color=color, lw=1, label=label if i == 0 else None)
            if any(r is not None for r in c["reward"]):
                reward_ax.plot([t for t, r in zip(c["step"], c["reward"]) if r is not None], smooth(c["reward"]),
                               color=color, lw=1, label=label if i == 0 else None)
    only = res["curves"].get(f"refine-only-s{res['seeds'][0]}")
    if only:   # the NSP term alone, for scale: how far the reward moves when nothing else trains
        reward_ax.plot(only["step"], smooth(only["reward"]), color="gray", lw=1, label="REFINE without the NTP term")
    if tails:   # the first fifth of the steps (the fall from the base's short-context loss) is off the scale
        loss_ax.set_ylim(min(tails) - 0.005, max(tails) + 0.005)
    loss_ax.set(title="mid-training NTP loss (moving average 25, zoomed)", xlabel="step")
    reward_ax.set(title="REFINE mean cosine reward of the rollouts (moving average 25)", xlabel="step")
    reward_ax.text(0.02, 0.04, "SFT samples no rollouts", transform=reward_ax.transAxes, fontsize=8)
    loss_ax.legend(fontsize=8)
    reward_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def readme_summary(res):
    """The README's toy-results section: one table, one verdict per comparison (each its own clause, from
    verdict.paired), the REFINE signal in one sentence, the figures, a link."""
    runs, seeds, L = res["runs"], res["seeds"], res["lengths"]
    out = [f"`{res['command'].replace('python reproduce.py', 'python -m study.reproduce')}` "
           f"({res['wall_s']['total'] / 60:.0f} min on {res['cpus']} CPU cores): mid-training of one base for "
           f"{res['args']['mid_steps']} steps with SFT and with REFINE, {len(seeds)} seeds; NIAH percent over "
           f"{res['args']['n_eval']} held-out prompts per setting, averaged over the lengths {', '.join(map(str, L))}.",
           "", "| variant | base | SFT, mean ± sd | REFINE, mean ± sd | REFINE − SFT paired by seed, mean [95% "
           "interval] |", "|---|---|---|---|---|"]
    for v in VARIANTS + ("average",):
        def get(r, v=v):   # the mean over lengths of one variant, or of everything
            return run_avg(r)[0] if v == "average" else sum(r["niah"][f"{v}@{n}"]["mean"] for n in L) / len(L)
        sft, ref = [get(runs[f"sft-s{s}"]) for s in seeds], [get(runs[f"refine-s{s}"]) for s in seeds]
        out.append(f"| {v} | {100 * get(res['base_eval']):.1f} | {cell(sft)} | {cell(ref)} | "
                   f"{interval(paired([100 * (r - f) for r, f in zip(ref, sft)]))} |")
    comparisons = [("refine", "sft", "REFINE", "SFT", "mid-training (the table)")]
    if "long_base" in res:
        comparisons.append(("long-refine", "long-sft", "REFINE", "SFT", "a second toy with 3-6-word answers"))
    if f"post-lambda0-s{seeds[0]}" in runs:
        comparisons.append(("post-refine", "post-lambda0", "nested REFINE", "the same nested loop with lambda_RL 0",
                            "post-training"))
    elif f"post-sft-s{seeds[0]}" in runs:   # results of before the lambda_RL 0 control
        comparisons.append(("post-refine", "post-sft", "nested REFINE", "SFT-only", "post-training (not a "
                            "controlled comparison: SFT-only takes one AdamW step per batch, on the answers alone)"))
    if f"refine-mb4-s{seeds[0]}" in runs:
        comparisons.append(("refine-mb4", "sft-mb4", "REFINE", "SFT", "both with 4 AdamW steps per batch"))
    out += ["", "One verdict per comparison, on average NIAH paired by seed: the mean difference and its 95% interval "
            "(Student's t, n - 1 degrees of freedom); \"better\" or \"worse\" only when the interval excludes 0.", ""]
    for a, b, first, second, where in comparisons:
        v = experiments.compare(runs, seeds, a, b)
        out.append(f"- {where}: {first} is **{v['word']}** {second} ({first} − {second} {interval(v)} points, "
                   f"{v['n']} seeds).")
    second = "Every other number (the base, validation, test-time training, ablations, diagnostics) is in " \
             "[results/results.md](results/results.md)."
    curve = res.get("reward_curves", {}).get(f"refine-only-s{seeds[0]}")
    if curve:
        main = [res["reward_curves"][f"refine-s{s}"] for s in seeds]
        second = (f"Without the NTP term, REFINE's NSP term raises its own mean cosine reward from "
                  f"{curve['first']:.2f} to {curve['last']:.2f} while NIAH falls to "
                  f"{100 * experiments.avg(runs[f'refine-only-s{seeds[0]}']):.1f}; with it, the reward of the first "
                  f"vs last 50 steps is {sum(c['first'] for c in main) / len(main):.2f} → "
                  f"{sum(c['last'] for c in main) / len(main):.2f} (curves below). " + second)
    return "\n".join(out + ["", second, "", "![NIAH](results/niah.png)", "", "![curves](results/curves.png)"]) + "\n"


def update_readme(path, section, name="toy-results"):
    """Put `section` between the lines <!-- name:start --> and <!-- name:end --> of the file at path (the README
    blocks written by a command: toy-results here, seeds:P by study/seeds.py, benchmarks by bench.py --readme).
    -> whether the markers were there."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = Path(path).read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    Path(path).write_text(f"{head}{start}\n{section.strip()}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated the {name} block of {path}")
    return True


def readme_block(path, name):
    """The text between the markers of update_readme (stripped), or None without them."""
    text = Path(path).read_text()
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    return text.split(start, 1)[1].split(end, 1)[0].strip() if start in text and end in text else None
