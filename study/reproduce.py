"""A toy reproduction of the paper's comparison on a CPU: from one base model that recalls partially, mid-train with
next-token prediction only (SFT) and with REFINE, 5 seeds each; score RULER-style NIAH at three lengths and the
validation loss; then test-time training with and without REFINE; then what the REFINE signal does.

    python -m study.reproduce --ablations    # everything -> results/ (see the README for its time on 2 CPU cores)
    python -m study.reproduce                # without the ablations (selection modes, reward, k, c)
    python -m study.reproduce --quick        # a smoke run of every stage in about a minute (too small to conclude)
    python -m study.reproduce --out_dir=out/repro --jobs=2 --seeds=0,1,2,3,4 --mid_steps=300 --n_eval=200 --ablations

Every training run is train.py itself (train.main with its own --out_dir). Work that the same command left in
--out_dir with the same settings is reused (the bases, finished runs); anything else there is redone. Each run's
train.py flags are recorded (results.json) with their paths relative to --out_dir.
  1. base: NTP pretraining at T=64, batch 64, answer values weighted 11x (so recall appears within minutes), in
     segments of --base_check steps; after each, mean NIAH@256 over S/MK/MQ/MV is measured and pretraining stops at
     the first check that reaches --base_threshold: a base that recalls PARTIALLY, whatever the seed's timing.
  2. mid-training from the base at T=256 for --mid_steps steps: objective=sft and objective=refine (paper defaults:
     c=8, k=5, n=1, entropy selection, cosine reward, lambda_RL 0.2), one run per seed; plain NTP loss (no weights).
  3. NIAH S/MK/MQ/MV at --lengths (--n_eval held-out prompts each, RULER string_match_all) and validation loss on
     held-out documents, for the base and every run.
  4. test-time training of the base on other held-out NIAH prompts, reset after each: REFINE (binary reward,
     lambda_RL 0.4) vs the same number of NTP-only steps (lambda_RL 0) vs no adaptation (evaluate.ttt_evaluate).
  5. experiments.py: a REFINE-only run (no NTP term), a second toy with 3-6-word answers (its base continues the
     first one; SFT vs REFINE for every seed) and, with --ablations, selection entropy / uniform / answer for the
     first --selection_seeds seeds, post-training (nested REFINE vs nested with lambda_RL 0 vs SFT-only), 4 AdamW
     steps per batch for REFINE and SFT, and REFINE-only with a frozen reward encoder; diagnose.py: where REFINE's
     positions fall, rewards, advantages, NSP vs NTP gradient norms.
  6. results.md (tables), results.json (every number), niah.png and curves.png in --results_dir; with the
     default --results_dir also the README's short summary. --report redoes step 6 alone from results.json.
Every verdict (better / worse / not distinguishable) is study/verdict.py's one rule: the 95% t interval of the mean
paired difference.
"""
import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing import get_context
from pathlib import Path

# on a shared CPU, busy-waiting OpenMP threads made a 2-thread step ~20x slower (measured 0.75 s -> 17 s): set
# before torch loads (the worker processes inherit it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import config
import data
import evaluate
import step
import train
from checkpoint import load_pretrained
from study import diagnose, experiments
from study.report import markdown, plot_curves, plot_niah, readme_summary, summary, update_readme

ROOT = Path(__file__).resolve().parents[1]   # the repository
VARIANTS = ("S", "MK", "MQ", "MV")
EVAL_SEED, TTT_SEED, VAL_SEED = 9001, 9002, 9003      # held-out streams (eval salts differ from training's)
DATA = ["--value_tokens=2", "--doc_styles=S,MQ,MV", "--min_needles=1", "--n_needles=4"]
OPTIM = ["--beta1=0.9", "--beta2=0.98", "--weight_decay=0.1", "--grad_clip=1.0"]
REFINE = ["--n_chunks=8", "--rollout_len=5", "--n_rollouts=1", "--reward=cosine", "--lambda_rl=0.2",
          "--lambda_sft=1.0", "--select_mode=entropy", "--margin=8"]
ABLATIONS = {"refine-binary": ["--reward=binary"], "refine-k3": ["--rollout_len=3"], "refine-c4": ["--n_chunks=4"]}
QUICK = dict(seeds="0", mid_steps=3, mid_seq_len=64, mid_batch=4, n_eval=3, lengths="64,128", base_check=4,
             base_max=4, base_eval=2, n_ttt=1, ttt_steps=1, val_batches=1, long_steps=3, long_lengths="128",
             refine_only_steps=3, diag_batches=1, long_base_max=4, post_steps=2)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/repro", help="training runs (reused when the settings match)")
    p.add_argument("--results_dir", default=str(ROOT / "results"), help="results.md, results.json, niah.png, "
                   "curves.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: " + json.dumps(QUICK))
    p.add_argument("--report", action="store_true", help="no runs: redraw the figures and rewrite results.md (and "
                   "the README section) from --results_dir/results.json")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--model", default="toy-deltanet", choices=("toy-deltanet", "toy-lact"))
    p.add_argument("--seeds", default="0,1,2,3,4", help="mid-training seeds (data order and rollouts)")
    p.add_argument("--selection_seeds", type=int, default=3, help="--ablations: the uniform and answer-aware "
                   "selection runs use the first N seeds (the costliest REFINE runs; 3 keeps the study in ~90 min)")
    p.add_argument("--base_metric", default="MK", choices=("mean",) + VARIANTS,
                   help="the recall check: NIAH@256 of one variant, or the mean of all four")
    p.add_argument("--base_threshold", type=float, default=0.35, help="stop the base when the check reaches it")
    p.add_argument("--base_check", type=int, default=25, help="base steps between recall checks")
    p.add_argument("--base_max", type=int, default=1500, help="base steps at most")
    p.add_argument("--base_eval", type=int, default=64, help="prompts per variant in a base recall check")
    p.add_argument("--mid_steps", type=int, default=400)
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
    p.add_argument("--ablations", action="store_true", help="also REFINE variants: selection uniform and answer "
                   "(every seed), and on the first seed " + ", ".join(ABLATIONS))
    p.add_argument("--refine_only_steps", type=int, default=200, help="the REFINE-only runs (no NTP term)")
    p.add_argument("--post_steps", type=int, default=100, help="post-training steps (--ablations)")
    p.add_argument("--diag_batches", type=int, default=4, help="held-out batches of 16 for the REFINE diagnostics")
    p.add_argument("--long_threshold", type=float, default=0.2, help="the second toy's base: continue the base on "
                   "3-6-word values until --base_metric reaches this")
    p.add_argument("--long_base_max", type=int, default=100, help="the second toy's base: steps at most")
    p.add_argument("--long_steps", type=int, default=300, help="mid-training steps of the second toy (3-6 words)")
    p.add_argument("--long_lengths", default="256,512", help="NIAH context lengths of the second toy")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if min(args.jobs, args.mid_steps, args.n_eval, args.base_check, args.selection_seeds) < 1:
        p.error("--jobs, --mid_steps, --n_eval, --base_check and --selection_seeds must be positive")
    return args

# ----------------------------------------------------------------------------------------------- evaluation


def niah_scores(model, tok, variant, length, n, seed, value_tokens=2):
    """Per-prompt RULER string_match_all scores (exact match for S and MK) of greedy answers -> list of floats.
    value_tokens: words per value, an int or a range (lo, hi) (the second toy's multi-token answers)."""
    examples = evaluate.niah_examples(tok, variant, length, n, seed, n_needles=4, value_tokens=value_tokens)
    gen = evaluate.generate_all(model, [e["prompt_ids"] for e in examples],
                                [len(e["target_ids"]) + 2 for e in examples], tok.eos_id, batch_size=32)
    return [data.niah_score(evaluate.decode(tok, g), e["answers"]) for g, e in zip(gen, examples)]


@torch.no_grad()
def validation(model, tok, seq_len, n_batches, value_tokens=2):
    """NTP loss and greedy accuracy on held-out documents, and the loss and teacher-forced greedy accuracy on answer
    values alone."""
    hi = data.value_range(value_tokens)[1]
    needles = (1, min(4, seq_len // (14 + 2 * hi)))                             # what fits, as train.load_data
    val = data.SyntheticData(tok, seq_len, VAL_SEED, needles, value_tokens, ("S", "MQ", "MV"))
    batches = [val.get_batch(16, with_mask=True) for _ in range(n_batches)]    # ([16, T+1], answer mask)
    out = evaluate.eval_validation(model, [b for b, _ in batches])
    nll, hits, count = 0.0, 0, 0
    for batch, answers in batches:
        x, y, mask = batch[:, :-1], batch[:, 1:], answers[:, 1:]                # [16, T]; mask: answer values
        logits = model(x).logits                                                 # [16, T, V]
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        nll, count = nll + ce[mask].sum().item(), count + int(mask.sum())
        hits += int((logits.argmax(-1) == y)[mask].sum())
    return dict(val_loss=out["loss"], val_acc=out["acc"], answer_loss=nll / max(count, 1),
                answer_acc=hits / max(count, 1))


def evaluate_model(hf_dir, lengths, n_eval, val_seq_len, val_batches, value_tokens=2):
    model = load_pretrained(str(hf_dir)).eval()
    tok = data.get_tokenizer("word")
    niah = {f"{v}@{L}": summary(niah_scores(model, tok, v, L, n_eval, EVAL_SEED, value_tokens))
            for v in VARIANTS for L in lengths}
    return dict(niah=niah, **validation(model, tok, val_seq_len, val_batches, value_tokens))

# ----------------------------------------------------------------------------------------------- runs


def run_train(argv, out_dir, log_path):
    """train.main(argv) with its output in log_path; RuntimeError when it fails. argv's --out_dir and --init_from
    are recorded relative to the study's out_dir (results.json means the same on every machine): made absolute here."""
    here = [f"{a.split('=', 1)[0]}={Path(out_dir) / a.split('=', 1)[1]}"
            if a.startswith(("--out_dir=", "--init_from=")) else a for a in argv]
    with open(log_path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        code = train.main(here)
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


def pretrain_base(args, base_dir, data_args=DATA, value_tokens=2, init_from=None, threshold=None, max_steps=None):
    """Step 1: NTP pretraining in segments, stopped at the first recall check that reaches the threshold.
    data_args / value_tokens: the synthetic data (train.py flags) and its value length for the recall check;
    init_from: start from these weights (a curriculum) instead of a fresh model; threshold / max_steps: instead of
    --base_threshold / --base_max."""
    threshold = args.base_threshold if threshold is None else threshold
    max_steps = args.base_max if max_steps is None else max_steps
    argv = ["--preset=toy", f"--model={args.model}", f"--out_dir={base_dir.name}", "--phase=pretrain",
            "--objective=sft", "--warmup_steps=0", "--seq_len=64", "--batch_size=64", "--lr=3e-3",
            "--lr_schedule=constant", "--lr_warmup=50", "--answer_weight=11", "--seed=0", "--eval_examples=0",
            "--eval_batches=1", "--log_interval=25", *data_args, *OPTIM]
    if init_from:   # recorded relative to the study's --out_dir, like --out_dir
        argv.append(f"--init_from={init_from.relative_to(base_dir.parent)}")
    signature = dict(argv=argv, check=args.base_check, max=max_steps, threshold=threshold,
                     eval=args.base_eval, metric=args.base_metric)
    result = fresh(base_dir, signature)
    if result:
        print(f"base: reusing {base_dir} ({result['steps']} steps)")
        return dict(result, reused=True)
    os.makedirs(base_dir)
    t0, history, tok, steps = time.time(), [], data.get_tokenizer("word"), 0
    while steps < max_steps:
        steps = min(steps + args.base_check, max_steps)
        run_train(argv + [f"--max_steps={steps}"] + (["--resume"] if history else []), base_dir.parent,
                  base_dir / "train.log")
        model = load_pretrained(str(base_dir / "hf")).eval()
        acc = {v: sum(niah_scores(model, tok, v, 256, args.base_eval, EVAL_SEED + 10, value_tokens)) /
                  args.base_eval
               for v in VARIANTS}
        history.append(dict(step=steps, **acc, mean=sum(acc.values()) / len(acc)))
        print(f"base step {steps}: NIAH@256 " + " ".join(f"{v} {100 * a:.0f}" for v, a in acc.items()) +
              f" | mean {100 * history[-1]['mean']:.1f} (stop at {args.base_metric} >= "
              f"{100 * threshold:.0f})", flush=True)
        if history[-1][args.base_metric] >= threshold:
            break
    result = dict(signature=signature, steps=steps, history=history, wall_s=time.time() - t0,
                  reached=history[-1][args.base_metric] >= threshold, threshold=threshold)
    (base_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def mid_argv(args, base_dir, run_dir, objective, seed, extra=(), data_args=DATA):
    return ["--preset=toy", f"--init_from={base_dir / 'hf'}", f"--out_dir={run_dir}", "--phase=mid",
            f"--objective={objective}", "--warmup_steps=0", f"--max_steps={args.mid_steps}",
            f"--seq_len={args.mid_seq_len}", f"--batch_size={args.mid_batch}", f"--lr={args.mid_lr}",
            "--lr_schedule=cosine", "--lr_warmup=20", f"--seed={seed}", "--answer_weight=1", "--eval_examples=0",
            "--eval_batches=1", "--log_interval=50", *data_args, *OPTIM, *REFINE, *extra]


def mid_task(argv, run_dir, eval_kw):
    """Step 2 + 3 for one run (in a worker process): train, then evaluate. -> result dict (also in result.json)."""
    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    run_train(argv, run_dir.parent, run_dir / "train.log")
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
    opt = step.make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(TTT_SEED)
    out = {}
    for v in VARIANTS:
        examples = evaluate.niah_examples(tok, v, length, n, TTT_SEED, n_needles=4, value_tokens=2)
        r = evaluate.ttt_evaluate(model, opt, examples, cfg, steps, tok, len(examples[0]["target_ids"]) + 2,
                                  data.niah_score, reset=True, generator=gen)
        out[v] = dict(none=[e["base"] for e in r["per_example"]], adapted=[e["adapted"] for e in r["per_example"]])
    return dict(per_variant=out, wall_s=time.time() - t0)

# ----------------------------------------------------------------------------------------------- main


def job_order(job):
    """Sort key, longest jobs first so that the pool's tail stays short: the mid-training REFINE runs and test-time
    training, then the other runs, then the base evaluations (a stable sort keeps the order within each)."""
    name, _, fn, _ = job
    if fn is base_eval_task:
        return 2
    return 0 if fn is ttt_task or (name.startswith("refine") and not name.startswith("refine-only")) else 1


def run_all(args):
    out_dir = Path(args.out_dir).resolve()
    base_dir, long_dir = out_dir / f"base-{args.model}", out_dir / f"base-long-{args.model}"
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = tuple(int(n) for n in args.lengths.split(","))
    long_lengths = tuple(int(n) for n in args.long_lengths.split(","))
    eval_kw = dict(lengths=lengths, n_eval=args.n_eval, val_seq_len=args.mid_seq_len, val_batches=args.val_batches)
    toys = {"main": (base_dir, DATA, eval_kw),   # toy -> (base, data flags, evaluation); JSON-safe (lists)
            "long": (long_dir, experiments.LONG_DATA, dict(eval_kw, lengths=long_lengths,
                                                            value_tokens=list(experiments.LONG_VALUES)))}
    torch.set_num_threads(args.jobs)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    base = pretrain_base(args, base_dir)
    long_base = pretrain_base(args, long_dir, experiments.LONG_DATA, list(experiments.LONG_VALUES), base_dir / "hf",
                              args.long_threshold, args.long_base_max)
    runs = {f"{obj}-s{s}": (obj, s, (), "main") for obj in ("refine", "sft") for s in seeds}
    if args.ablations:
        runs.update({f"{name}-s{seeds[0]}": ("refine", seeds[0], tuple(extra), "main")
                     for name, extra in ABLATIONS.items()})
    runs.update(experiments.extra_runs(args, seeds))
    results, jobs, reused = {}, [], []
    for name, (obj, seed, extra, toy) in runs.items():
        bdir, data_args, kw = toys[toy]
        argv = mid_argv(args, bdir.relative_to(out_dir), Path(f"{args.model}-{name}"), obj, seed, extra, data_args)
        signature = dict(argv=argv, eval=kw | {"lengths": list(kw["lengths"])},
                         base_steps=(base if toy == "main" else long_base)["steps"])
        done = fresh(out_dir / f"{args.model}-{name}", signature)
        if done:
            print(f"{name}: reusing {out_dir / f'{args.model}-{name}'}")
            results[name], reused = done, reused + [name]
        else:
            jobs.append((name, signature, mid_task, (argv, str(out_dir / f"{args.model}-{name}"), kw)))
    for cond, lam in (("ttt-refine", 0.4), ("ttt-ntp", 0.0)):
        jobs.append((cond, None, ttt_task, (str(base_dir / "hf"), lam, args.n_ttt, args.ttt_steps, args.ttt_lr,
                                            min(256, max(lengths)))))
    jobs.append(("base", None, base_eval_task, (str(base_dir / "hf"), eval_kw)))
    jobs.append(("long-base", None, base_eval_task, (str(long_dir / "hf"), toys["long"][2])))
    jobs.sort(key=job_order)
    t_pool = time.time()
    print(f"running {len(jobs)} jobs, {args.jobs} at a time: {', '.join(j[0] for j in jobs)}", flush=True)
    outputs, signatures = {}, {name: signature for name, signature, _, _ in jobs}

    def finished(name, output):   # a finished run keeps its result at once, for the next invocation
        outputs[name] = output
        if signatures[name] is not None:
            output["signature"] = signatures[name]
            (out_dir / f"{args.model}-{name}" / "result.json").write_text(json.dumps(output, indent=1))
            results[name] = output
        print(f"  done: {name} ({time.time() - t_pool:.0f}s)", flush=True)
    if args.jobs == 1:
        for name, _, fn, fargs in jobs:
            finished(name, fn(*fargs))
    else:
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(fn, *fargs): name for name, _, fn, fargs in jobs}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    t_runs = time.time() - t_pool
    torch.set_num_threads(args.jobs)
    s0 = seeds[0]
    diag = diagnose.diagnose_models({"base": base_dir / "hf", f"refine-s{s0} (end)": out_dir /
                                     f"{args.model}-refine-s{s0}" / "hf", f"refine-only-s{s0} (end)":
                                     out_dir / f"{args.model}-refine-only-s{s0}" / "hf"},
                                    REFINE, args.mid_seq_len, args.diag_batches, VAL_SEED + 1)
    metrics = {name: out_dir / f"{args.model}-{name}" / "metrics.jsonl" for name in runs}
    curves = {name: read_curve(path) for name, path in metrics.items()}
    reward_curves = {name: diagnose.reward_curve(path) for name, path in metrics.items() if runs[name][0] == "refine"}
    return dict(args=dict(vars(args), results_dir=recorded(args.results_dir)), seeds=seeds, lengths=list(lengths),
                base=base, base_eval=outputs["base"],
                runs=results, ttt={"refine": outputs["ttt-refine"], "ntp": outputs["ttt-ntp"]}, curves=curves,
                long_base=long_base, long_base_eval=outputs["long-base"], long_lengths=list(long_lengths),
                diagnostics=diag, reward_curves=reward_curves,
                wall_s=dict(base=base["wall_s"] + long_base["wall_s"], runs_and_evals=t_runs,
                            diagnostics=time.time() - t_pool - t_runs, total=time.time() - t_start),
                versions=train.versions(), cpus=os.cpu_count(), reused=reused,
                ablations={f"{name}-s{s0}": extra for name, extra in ABLATIONS.items()} if args.ablations else {})


def recorded(path):
    """A path as results.json records it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_curve(path):
    rows = [json.loads(line) for line in open(path)] if Path(path).exists() else []
    rows = [r for r in rows if "step" in r]
    return dict(step=[r["step"] for r in rows], ntp_loss=[r["ntp_loss"] for r in rows],
                reward=[r["reward_mean"] for r in rows])


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    results_dir = Path(args.results_dir)
    if args.report:   # only the report and figures, from the results.json of an earlier invocation
        res = json.loads((results_dir / "results.json").read_text())
    else:
        command = "python -m study.reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
        res = run_all(args)
        res["command"] = command.strip()
        log = Path(args.out_dir) / "invocations.jsonl"   # what each invocation computed, and how long it took
        with open(log, "a") as f:
            f.write(json.dumps(dict(command=res["command"], total_s=res["wall_s"]["total"], base_reused=bool(
                res["base"].get("reused")), runs_reused=res["reused"], runs=sorted(res["runs"]))) + "\n")
        res["invocations"] = [json.loads(line) for line in open(log)]
        os.makedirs(args.results_dir, exist_ok=True)
        (results_dir / "results.json").write_text(json.dumps(res, indent=1))
    plot_niah(res, results_dir / "niah.png")
    plot_curves(res, results_dir / "curves.png")
    (results_dir / "results.md").write_text(markdown(res))
    print(f"wrote {results_dir / 'results.md'}, niah.png, curves.png, results.json "
          f"({res['wall_s']['total']:.0f}s in all)")
    if results_dir.resolve() == (ROOT / "results").resolve():
        update_readme(ROOT / "README.md", readme_summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
