"""The report of reproduce.py: the statistics (mean, standard error, the paired verdict), results.md, niah.png,
curves.png and the README's short summary between the toy-results markers. Tensors never reach this file: it reads
the result dicts that reproduce.py collects (results.json)."""
import math

from study import experiments

VARIANTS = ("S", "MK", "MQ", "MV")


def summary(scores):
    """Mean and standard error of per-prompt scores -> dict(mean, se, n)."""
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    return dict(mean=mean, se=sd / math.sqrt(n), n=n)


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def cell(xs):
    m, sd = mean_sd([100 * x for x in xs])
    return f"{m:.1f} ± {sd:.1f}" if len(xs) > 1 else f"{m:.1f}"


def run_avg(result):
    """Mean NIAH over every variant@length of one run, and its standard error from the prompts."""
    cells = list(result["niah"].values())
    return (sum(c["mean"] for c in cells) / len(cells), math.sqrt(sum(c["se"] ** 2 for c in cells)) / len(cells))


def verdict(res):
    """REFINE - SFT on the average NIAH, paired by seed (same base, same documents, same seed)."""
    pairs = [(run_avg(res["runs"][f"refine-s{s}"]), run_avg(res["runs"][f"sft-s{s}"])) for s in res["seeds"]]
    diffs = [100 * (r[0] - f[0]) for r, f in pairs]
    m, sd = mean_sd(diffs)
    query_se = 100 * math.sqrt(sum(r[1] ** 2 + f[1] ** 2 for r, f in pairs)) / len(pairs)
    se = max(sd / math.sqrt(len(diffs)), query_se)
    word = "better than" if m > 2 * se else "worse than" if m < -2 * se else "not distinguishable from"
    return dict(diffs=diffs, mean=m, sd=sd, se=se, query_se=query_se, word=word)


def markdown(res):
    a, runs, seeds, L = res["args"], res["runs"], res["seeds"], res["lengths"]
    keys = [f"{v}@{n}" for v in VARIANTS for n in L]
    ver = verdict(res)
    n_eval = a["n_eval"]
    out = [f"# Toy reproduction: REFINE vs SFT mid-training, and test-time training ({a['model']}, CPU)", "",
           f"Produced by `{res['command']}` in {res['wall_s']['total'] / 60:.1f} min on {res['cpus']} CPU cores "
           f"({res['versions']}). Every number is measured by that command; results.json holds them all.", "",
           "## Setup", "",
           f"- Data: the synthetic grammar of data.py, word-level tokenizer (one token per word), needles "
           f"\"The code for K is V1 V2 .\" with 2-token values; training documents hold 1-4 needles and end with "
           f"queries for all of them in the styles S, MQ, MV (answers predictable from context).",
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
    out += ["", "## 2. Mid-training: NIAH (percent, mean ± std over seeds; REFINE − SFT paired by seed)", "",
            "| setting | base | SFT | REFINE | REFINE − SFT |", "|---|---|---|---|---|"]
    for k in keys + ["average"]:
        get = (lambda r: run_avg(r)[0]) if k == "average" else (lambda r, k=k: r["niah"][k]["mean"])
        sft = [get(runs[f"sft-s{s}"]) for s in seeds]
        ref = [get(runs[f"refine-s{s}"]) for s in seeds]
        out.append(f"| {k} | {100 * get(res['base_eval']):.1f} | {cell(sft)} | {cell(ref)} | "
                   f"{cell([r - f for r, f in zip(ref, sft)])} |")
    out += ["", "## 3. Validation (held-out documents, T=%d)" % a["mid_seq_len"], "",
            "| model | NTP loss | next-token acc | answer-value loss |", "|---|---|---|---|",
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
            f"after each; percent ± SE)", "",
            "| variant | no adaptation | NTP only (lambda_RL 0) | REFINE (binary, lambda_RL 0.4) | REFINE − NTP |",
            "|---|---|---|---|---|"]
    ttt = res["ttt"]
    for v in VARIANTS + ("all",):
        pick = (lambda c, k: [x for u in VARIANTS for x in ttt[c]["per_variant"][u][k]]) if v == "all" else \
            (lambda c, k, v=v: ttt[c]["per_variant"][v][k])
        none, ntp, ref = pick("ntp", "none"), pick("ntp", "adapted"), pick("refine", "adapted")
        s = [summary(x) for x in (none, ntp, ref)]
        d = summary([r - n for r, n in zip(ref, ntp)])
        out.append(f"| {v} | " + " | ".join(f"{100 * x['mean']:.1f} ± {100 * x['se']:.1f}" for x in s) +
                   f" | {100 * d['mean']:+.1f} ± {100 * d['se']:.1f} |")
    out += ["", "## 6. Verdict", "",
            f"Average NIAH over the {len(keys)} settings, REFINE − SFT per seed: "
            + ", ".join(f"{d:+.1f}" for d in ver["diffs"]) + f" points; mean {ver['mean']:+.1f} (standard error "
            f"{ver['se']:.1f}: the larger of the seed spread {ver['sd']:.1f}/sqrt({len(seeds)}) and the prompt "
            f"sampling error {ver['query_se']:.1f}; the prompts are the same for both, so the latter is "
            f"conservative). At this toy scale REFINE mid-training is **{ver['word']}** SFT (threshold: 2 "
            f"standard errors; {sum(d > 0 for d in ver['diffs'])} of {len(ver['diffs'])} seeds favour REFINE).",
            "",
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
    """The README's toy-results section: one table, the figures, the verdict in two sentences, a link."""
    runs, seeds, L = res["runs"], res["seeds"], res["lengths"]
    ver = verdict(res)
    out = [f"`{res['command'].replace('python reproduce.py', 'python -m study.reproduce')}` "
           f"({res['wall_s']['total'] / 60:.0f} min on {res['cpus']} CPU cores): mid-training of one base for "
           f"{res['args']['mid_steps']} steps with SFT and with REFINE, {len(seeds)} seeds; NIAH percent over "
           f"{res['args']['n_eval']} held-out prompts per setting, averaged over the lengths {', '.join(map(str, L))}"
           " (mean ± sd over seeds; REFINE − SFT paired by seed).", "",
           "| variant | base | SFT | REFINE | REFINE − SFT |", "|---|---|---|---|---|"]
    for v in VARIANTS + ("average",):
        def get(r, v=v):   # the mean over lengths of one variant, or of everything
            return run_avg(r)[0] if v == "average" else sum(r["niah"][f"{v}@{n}"]["mean"] for n in L) / len(L)
        sft, ref = [get(runs[f"sft-s{s}"]) for s in seeds], [get(runs[f"refine-s{s}"]) for s in seeds]
        out.append(f"| {v} | {100 * get(res['base_eval']):.1f} | {cell(sft)} | {cell(ref)} | "
                   f"{cell([r - f for r, f in zip(ref, sft)])} |")
    sentence = [f"REFINE is **{ver['word']}** SFT on this toy: REFINE − SFT {ver['mean']:+.1f} points "
                f"(standard error {ver['se']:.1f}) on average NIAH"]
    if "long_base" in res:
        d = [100 * (experiments.avg(runs[f"long-refine-s{s}"]) - experiments.avg(runs[f"long-sft-s{s}"]))
             for s in seeds]
        sentence.append("{:+.1f} (standard error {:.1f}) on a second toy with 3-6-word answers".format(
            *experiments.mean_se(d)))
    if f"post-sft-s{seeds[0]}" in runs:
        for a, b, what in (("post-refine", "post-sft", "in post-training (nested REFINE vs SFT on the answers alone)"),
                           ("refine-mb4", "sft-mb4", "when both take 4 AdamW steps per batch (PPO mini-batches)")):
            _, m, se, _ = experiments.paired(runs, seeds, a, b)
            sentence.append(f"{m:+.1f} (standard error {se:.1f}) {what}")
    second = "Every other number (the base, validation, test-time training, ablations, diagnostics) is in " \
             "[results/results.md](results/results.md)."
    curve = res.get("reward_curves", {}).get(f"refine-only-s{seeds[0]}")
    if curve:
        main = [res["reward_curves"][f"refine-s{s}"] for s in seeds]
        second = (f"Its NSP term does optimise its own reward: without the NTP term the mean cosine reward rises "
                  f"from {curve['first']:.2f} to {curve['last']:.2f} while NIAH collapses to "
                  f"{100 * experiments.avg(runs[f'refine-only-s{seeds[0]}']):.1f}, and with it the reward levels off "
                  f"after the first steps (mean of the first vs last 50 steps: "
                  f"{sum(c['first'] for c in main) / len(main):.2f} → {sum(c['last'] for c in main) / len(main):.2f}; "
                  f"curves below); every other number is in [results/results.md](results/results.md).")
    return "\n".join(out + ["", ", and ".join(sentence) + ". " + second, "",
                            "![NIAH](results/niah.png)", "", "![curves](results/curves.png)"]) + "\n"


def update_readme(path, section, start="<!-- toy-results:start -->", end="<!-- toy-results:end -->"):
    """Put `section` (readme_summary) between the markers."""
    text = path.read_text()
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{section.strip()}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated the toy results in {path}")
