"""A toy reproduction of the paper's comparison on a CPU: from one base model that recalls partially, mid-train with
next-token prediction only (SFT) and with REFINE, 3 seeds each; score RULER-style NIAH at three lengths and the
validation loss; then test-time training with and without REFINE.

    python reproduce.py                      # the full run: about 20 minutes on 2 CPU cores -> results/
    python reproduce.py --quick              # a smoke run of every stage in about a minute (too small to conclude)
    python reproduce.py --out_dir=out/repro --jobs=2 --seeds=0,1,2 --mid_steps=300 --n_eval=200 --ablations

Every training run is train.py itself (train.main with its own --out_dir). Work that the same command left in
--out_dir with the same settings is reused (the base, finished runs); anything else there is redone.
  1. base: NTP pretraining at T=64, batch 64, answer values weighted 11x (so recall appears within minutes), in
     segments of --base_check steps; after each, mean NIAH@256 over S/MK/MQ/MV is measured and pretraining stops at
     the first check that reaches --base_threshold: a base that recalls PARTIALLY, whatever the seed's timing.
  2. mid-training from the base at T=256 for --mid_steps steps: objective=sft and objective=refine (paper defaults:
     c=8, k=5, n=1, entropy selection, cosine reward, lambda_RL 0.2), one run per seed; plain NTP loss (no weights).
  3. NIAH S/MK/MQ/MV at --lengths (--n_eval held-out prompts each, RULER string_match_all) and validation loss on
     held-out documents, for the base and every run.
  4. test-time training of the base on other held-out NIAH prompts, reset after each: REFINE (binary reward,
     lambda_RL 0.4) vs the same number of NTP-only steps (lambda_RL 0) vs no adaptation (evaluate.ttt_evaluate).
  5. results.md (tables), results.json (every number) and curves.png (needs matplotlib) in --results_dir.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

import config
import data
import evaluate
import train
from checkpoint import load_pretrained

ROOT = Path(__file__).resolve().parent
VARIANTS = ("S", "MK", "MQ", "MV")
EVAL_SEED, TTT_SEED, VAL_SEED = 9001, 9002, 9003      # held-out streams (eval salts differ from training's)
DATA = ["--value_tokens=2", "--doc_styles=S,MQ,MV", "--min_needles=1", "--n_needles=4"]
OPTIM = ["--beta1=0.9", "--beta2=0.98", "--weight_decay=0.1", "--grad_clip=1.0"]
REFINE = ["--n_chunks=8", "--rollout_len=5", "--n_rollouts=1", "--reward=cosine", "--lambda_rl=0.2",
          "--lambda_sft=1.0", "--select_mode=entropy", "--margin=8"]
ABLATIONS = {"refine-uniform": ["--select_mode=uniform"], "refine-binary": ["--reward=binary"],
             "refine-k3": ["--rollout_len=3"], "refine-c4": ["--n_chunks=4"]}
QUICK = dict(seeds="0", mid_steps=3, mid_seq_len=64, mid_batch=4, n_eval=3, lengths="64,128", base_check=4,
             base_max=4, base_eval=2, n_ttt=1, ttt_steps=1, val_batches=1)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/repro", help="training runs (reused when the settings match)")
    p.add_argument("--results_dir", default=str(ROOT / "results"), help="results.md, results.json, curves.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: " + json.dumps(QUICK))
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--model", default="toy-deltanet", choices=("toy-deltanet", "toy-lact"))
    p.add_argument("--seeds", default="0,1,2", help="mid-training seeds (data order and rollouts)")
    p.add_argument("--base_metric", default="MK", choices=("mean",) + VARIANTS,
                   help="the recall check: NIAH@256 of one variant, or the mean of all four")
    p.add_argument("--base_threshold", type=float, default=0.35, help="stop the base when the check reaches it")
    p.add_argument("--base_check", type=int, default=25, help="base steps between recall checks")
    p.add_argument("--base_max", type=int, default=1500, help="base steps at most")
    p.add_argument("--base_eval", type=int, default=64, help="prompts per variant in a base recall check")
    p.add_argument("--mid_steps", type=int, default=500)
    p.add_argument("--mid_seq_len", type=int, default=256)
    p.add_argument("--mid_batch", type=int, default=16)
    p.add_argument("--mid_lr", type=float, default=1e-3)
    p.add_argument("--n_eval", type=int, default=200, help="NIAH prompts per variant and length")
    p.add_argument("--lengths", default="256,512,1024", help="NIAH context lengths")
    p.add_argument("--val_batches", type=int, default=8, help="validation batches of 16 documents")
    p.add_argument("--n_ttt", type=int, default=100, help="test-time training prompts per variant (at 256)")
    p.add_argument("--ttt_steps", type=int, default=5, help="adaptation steps per prompt")
    p.add_argument("--ttt_lr", type=float, default=3e-4, help="AdamW lr of test-time training (1e-3 and above "
                   "made even NTP-only adaptation lose recall in a probe)")
    p.add_argument("--ablations", action="store_true", help="also REFINE variants, first seed: " +
                   ", ".join(ABLATIONS))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.jobs < 1 or args.mid_steps < 1 or args.n_eval < 1 or args.base_check < 1:
        p.error("--jobs, --mid_steps, --n_eval and --base_check must be positive")
    return args

# ----------------------------------------------------------------------------------------------- evaluation


def niah_scores(model, tok, variant, length, n, seed):
    """Per-prompt RULER string_match_all scores (exact match for S and MK) of greedy answers -> list of floats."""
    examples = evaluate.niah_examples(tok, variant, length, n, seed, n_needles=4, value_tokens=2)
    gen = evaluate.generate_all(model, [e["prompt_ids"] for e in examples],
                                [len(e["target_ids"]) + 2 for e in examples], tok.eos_id, batch_size=32)
    return [data.niah_score(evaluate.decode(tok, g), e["answers"]) for g, e in zip(gen, examples)]


def summary(scores):
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    return dict(mean=mean, se=sd / math.sqrt(n), n=n)


@torch.no_grad()
def validation(model, tok, seq_len, n_batches):
    """NTP loss and greedy accuracy on held-out documents, and the loss on answer values alone."""
    val = data.SyntheticData(tok, seq_len, VAL_SEED, (1, 4), 2, ("S", "MQ", "MV"))
    batches = [val.get_batch(16) for _ in range(n_batches)]                     # [16, T+1] each
    out = evaluate.eval_validation(model, batches)
    nll, count = 0.0, 0
    for batch in batches:
        x, y = batch[:, :-1], batch[:, 1:]
        mask = train.answer_mask(x, y, tok.name)                                 # [16, T] answer values
        ce = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        nll, count = nll + ce[mask].sum().item(), count + int(mask.sum())
    return dict(val_loss=out["loss"], val_acc=out["acc"], answer_loss=nll / max(count, 1))


def evaluate_model(hf_dir, lengths, n_eval, val_seq_len, val_batches):
    model = load_pretrained(str(hf_dir)).eval()
    tok = data.get_tokenizer("word")
    niah = {f"{v}@{L}": summary(niah_scores(model, tok, v, L, n_eval, EVAL_SEED)) for v in VARIANTS for L in lengths}
    return dict(niah=niah, **validation(model, tok, val_seq_len, val_batches))

# ----------------------------------------------------------------------------------------------- runs


def run_train(argv, log_path):
    """train.main(argv) with its output in log_path; RuntimeError when it fails."""
    with open(log_path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} failed with status {code}; see {log_path}")


def fresh(run_dir, signature):
    """The saved result of run_dir if it was made with `signature`, else None (and the folder is cleared)."""
    done = Path(run_dir) / "result.json"
    if done.exists():
        result = json.loads(done.read_text())
        if result.get("signature") == signature:
            return result
    if Path(run_dir).exists():
        print(f"  {run_dir}: other settings or unfinished; starting it over")
        shutil.rmtree(run_dir)
    return None


def pretrain_base(args, base_dir):
    """Step 1: NTP pretraining in segments, stopped at the first recall check that reaches the threshold."""
    argv = ["--preset=toy", f"--model={args.model}", f"--out_dir={base_dir}", "--phase=pretrain", "--objective=sft",
            "--warmup_steps=0", "--seq_len=64", "--batch_size=64", "--lr=3e-3", "--lr_schedule=constant",
            "--lr_warmup=50", "--answer_weight=11", "--seed=0", "--eval_examples=0", "--eval_batches=1",
            "--log_interval=25", *DATA, *OPTIM]
    signature = dict(argv=argv, check=args.base_check, max=args.base_max, threshold=args.base_threshold,
                     eval=args.base_eval, metric=args.base_metric)
    result = fresh(base_dir, signature)
    if result:
        print(f"base: reusing {base_dir} ({result['steps']} steps)")
        return dict(result, reused=True)
    os.makedirs(base_dir)
    t0, history, tok, steps = time.time(), [], data.get_tokenizer("word"), 0
    while steps < args.base_max:
        steps = min(steps + args.base_check, args.base_max)
        run_train(argv + [f"--max_steps={steps}"] + (["--resume"] if history else []), base_dir / "train.log")
        model = load_pretrained(str(base_dir / "hf")).eval()
        acc = {v: sum(niah_scores(model, tok, v, 256, args.base_eval, EVAL_SEED + 10)) / args.base_eval
               for v in VARIANTS}
        history.append(dict(step=steps, **acc, mean=sum(acc.values()) / len(acc)))
        print(f"base step {steps}: NIAH@256 " + " ".join(f"{v} {100 * a:.0f}" for v, a in acc.items()) +
              f" | mean {100 * history[-1]['mean']:.1f} (stop at {args.base_metric} >= "
              f"{100 * args.base_threshold:.0f})", flush=True)
        if history[-1][args.base_metric] >= args.base_threshold:
            break
    result = dict(signature=signature, steps=steps, history=history, wall_s=time.time() - t0,
                  reached=history[-1][args.base_metric] >= args.base_threshold)
    (base_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def mid_argv(args, base_dir, run_dir, objective, seed, extra=()):
    return ["--preset=toy", f"--init_from={base_dir / 'hf'}", f"--out_dir={run_dir}", "--phase=mid",
            f"--objective={objective}", "--warmup_steps=0", f"--max_steps={args.mid_steps}",
            f"--seq_len={args.mid_seq_len}", f"--batch_size={args.mid_batch}", f"--lr={args.mid_lr}",
            "--lr_schedule=cosine", "--lr_warmup=20", f"--seed={seed}", "--eval_examples=0", "--eval_batches=1",
            "--log_interval=50", *DATA, *OPTIM, *REFINE, *extra]


def mid_task(argv, run_dir, eval_kw):
    """Step 2 + 3 for one run (in a worker process): train, then evaluate. -> result dict (also in result.json)."""
    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    run_train(argv, run_dir / "train.log")
    t1 = time.time()
    result = dict(evaluate_model(run_dir / "hf", **eval_kw), train_s=t1 - t0, eval_s=time.time() - t1)
    return result


def base_eval_task(hf_dir, eval_kw):
    torch.set_num_threads(1)
    t0 = time.time()
    return dict(evaluate_model(hf_dir, **eval_kw), eval_s=time.time() - t0)


def ttt_task(hf_dir, lambda_rl, n, steps, lr, length):
    """Step 4 for one condition: per variant, evaluate.ttt_evaluate on n held-out prompts (reset after each)."""
    torch.set_num_threads(1)
    t0 = time.time()
    model = load_pretrained(str(hf_dir))
    tok = data.get_tokenizer("word")
    cfg = config.TrainConfig(reward="binary", lambda_rl=lambda_rl, lambda_sft=1.0, n_chunks=8, rollout_len=5,
                            n_rollouts=1, margin=8, lr=lr, eos_id=tok.eos_id)
    opt = train.make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(TTT_SEED)
    out = {}
    for v in VARIANTS:
        examples = evaluate.niah_examples(tok, v, length, n, TTT_SEED, n_needles=4, value_tokens=2)
        r = evaluate.ttt_evaluate(model, opt, examples, cfg, steps, tok, len(examples[0]["target_ids"]) + 2,
                                  data.niah_score, reset=True, generator=gen)
        out[v] = dict(none=[e["base"] for e in r["per_example"]], adapted=[e["adapted"] for e in r["per_example"]])
    return dict(per_variant=out, wall_s=time.time() - t0)

# ----------------------------------------------------------------------------------------------- report


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
            "![curves](curves.png)", ""]
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
    out += ["## Wall time", "",
            f"This invocation: base pretraining {res['wall_s']['base']:.0f} s" +
            (" (reused: the time of the invocation that made it)" if res["base"].get("reused") else "") +
            f", runs and evaluations {res['wall_s']['runs_and_evals']:.0f} s ({a['jobs']} at a time), total "
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

# ----------------------------------------------------------------------------------------------- main


def run_all(args):
    out_dir = Path(args.out_dir).resolve()
    base_dir = out_dir / f"base-{args.model}"
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = tuple(int(n) for n in args.lengths.split(","))
    eval_kw = dict(lengths=lengths, n_eval=args.n_eval, val_seq_len=args.mid_seq_len, val_batches=args.val_batches)
    torch.set_num_threads(args.jobs)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    base = pretrain_base(args, base_dir)
    runs = {f"{obj}-s{s}": (obj, s, ()) for obj in ("refine", "sft") for s in seeds}
    if args.ablations:
        runs.update({f"{name}-s{seeds[0]}": ("refine", seeds[0], tuple(extra)) for name, extra in ABLATIONS.items()})
    results, jobs, reused = {}, [], []
    for name, (obj, seed, extra) in runs.items():
        argv = mid_argv(args, base_dir, out_dir / f"{args.model}-{name}", obj, seed, extra)
        signature = dict(argv=argv, eval=eval_kw | {"lengths": list(lengths)}, base_steps=base["steps"])
        done = fresh(out_dir / f"{args.model}-{name}", signature)
        if done:
            print(f"{name}: reusing {out_dir / f'{args.model}-{name}'}")
            results[name], reused = done, reused + [name]
        else:
            jobs.append((name, signature, mid_task, (argv, str(out_dir / f"{args.model}-{name}"), eval_kw)))
    jobs.append(("base", None, base_eval_task, (str(base_dir / "hf"), eval_kw)))
    for cond, lam in (("ttt-refine", 0.4), ("ttt-ntp", 0.0)):
        jobs.append((cond, None, ttt_task, (str(base_dir / "hf"), lam, args.n_ttt, args.ttt_steps, args.ttt_lr,
                                            min(256, max(lengths)))))
    t_pool = time.time()
    print(f"running {len(jobs)} jobs, {args.jobs} at a time: {', '.join(j[0] for j in jobs)}", flush=True)
    if args.jobs == 1:
        outputs = {name: fn(*fargs) for name, _, fn, fargs in jobs}
    else:
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {name: pool.submit(fn, *fargs) for name, _, fn, fargs in jobs}
            outputs = {}
            for name, fut in futures.items():
                outputs[name] = fut.result()
                print(f"  done: {name} ({time.time() - t_pool:.0f}s)", flush=True)
    for name, signature, _, _ in jobs:
        if signature is not None:   # a finished run: keep its result for the next invocation
            outputs[name]["signature"] = signature
            (out_dir / f"{args.model}-{name}" / "result.json").write_text(json.dumps(outputs[name], indent=1))
            results[name] = outputs[name]
    torch.set_num_threads(args.jobs)
    curves = {name: read_curve(out_dir / f"{args.model}-{name}" / "metrics.jsonl") for name in runs}
    return dict(args=vars(args), seeds=seeds, lengths=list(lengths), base=base, base_eval=outputs["base"],
                runs=results, ttt={"refine": outputs["ttt-refine"], "ntp": outputs["ttt-ntp"]}, curves=curves,
                wall_s=dict(base=base["wall_s"], runs_and_evals=time.time() - t_pool, total=time.time() - t_start),
                versions=train.versions(), cpus=os.cpu_count(), reused=reused,
                ablations={name: list(extra) for name, (_, _, extra) in runs.items() if extra})


def read_curve(path):
    rows = [json.loads(line) for line in open(path)] if Path(path).exists() else []
    rows = [r for r in rows if "step" in r]
    return dict(step=[r["step"] for r in rows], ntp_loss=[r["ntp_loss"] for r in rows],
                reward=[r["reward_mean"] for r in rows])


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    command = "python reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = run_all(args)
    res["command"] = command.strip()
    log = Path(args.out_dir) / "invocations.jsonl"   # what each invocation computed, and how long it took
    with open(log, "a") as f:
        f.write(json.dumps(dict(command=res["command"], total_s=res["wall_s"]["total"], base_reused=bool(
            res["base"].get("reused")), runs_reused=res["reused"], runs=sorted(res["runs"]))) + "\n")
    res["invocations"] = [json.loads(line) for line in open(log)]
    os.makedirs(args.results_dir, exist_ok=True)
    results_dir = Path(args.results_dir)
    (results_dir / "results.json").write_text(json.dumps(res, indent=1))
    (results_dir / "results.md").write_text(markdown(res))
    print(plot(res, results_dir / "curves.png"))
    print(f"wrote {results_dir / 'results.md'}, results.json ({res['wall_s']['total']:.0f}s in all)")
    if results_dir.resolve() == (ROOT / "results").resolve():
        update_readme(ROOT / "README.md", markdown(res))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
