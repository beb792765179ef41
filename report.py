"""The report of reproduce.py: the statistics (mean, standard error, the paired verdict), results.md, curves.png and
the README section between the toy-results markers. Tensors never reach this file: it reads the result dicts that
reproduce.py collects (results.json)."""
import math

import experiments

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
            *(["![curves](curves.png)", ""] if res.get("figure", True) else [])]
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


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no figure (pip install matplotlib for curves.png)"
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    hist = res["base"]["history"]
    for v in VARIANTS:
        ax[0, 0].plot([h["step"] for h in hist], [100 * h[v] for h in hist], marker="o", ms=3, label=v)
    ax[0, 0].set(title="base pretraining: NIAH@256 (%)", xlabel="step")
    ax[0, 0].legend()
    for name, c in res["curves"].items():
        color = "tab:blue" if name.startswith("sft") else "tab:orange" if name.startswith("refine-s") else "gray"
        ax[0, 1].plot(c["step"], smooth(c["ntp_loss"]), color=color, lw=1, label=name)
        if any(r is not None for r in c["reward"]):
            ax[1, 0].plot([s for s, r in zip(c["step"], c["reward"]) if r is not None], smooth(c["reward"]),
                          color=color, lw=1, label=name)
    tails = [y for c in res["curves"].values() for y in smooth(c["ntp_loss"])[len(c["step"]) // 5:]]
    if tails:   # the first fifth of the steps (the fall from the base's short-context loss) is off the scale
        ax[0, 1].set_ylim(min(tails) - 0.005, max(tails) + 0.005)
    ax[0, 1].set(title="mid-training NTP loss (moving avg 25, zoomed)", xlabel="step")
    ax[0, 1].legend(fontsize=7)
    ax[1, 0].set(title="REFINE mean cosine reward (moving avg 25)", xlabel="step")
    ax[1, 0].legend(fontsize=7)
    ttt = res["ttt"]
    for i, (label, c, k) in enumerate((("none", "ntp", "none"), ("NTP only", "ntp", "adapted"),
                                        ("REFINE", "refine", "adapted"))):
        ys = [100 * sum(ttt[c]["per_variant"][v][k]) / len(ttt[c]["per_variant"][v][k]) for v in VARIANTS]
        ax[1, 1].bar([j + 0.27 * (i - 1) for j in range(len(VARIANTS))], ys, width=0.27, label=label)
    ax[1, 1].set_xticks(range(len(VARIANTS)), VARIANTS)
    ax[1, 1].set(title="test-time training of the base (NIAH %)")
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def update_readme(path, results_md, start="<!-- toy-results:start -->", end="<!-- toy-results:end -->"):
    """Put results.md (title dropped, headings demoted, figure path from the repo root) between the markers."""
    text = path.read_text()
    if start not in text or end not in text:
        return
    body = results_md.split("\n", 1)[1].strip().replace("](curves.png)", "](results/curves.png)")
    body = "\n".join("##" + line if line.startswith("## ") else line for line in body.split("\n"))
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated the toy results in {path}")
