"""A preset over seeds, or presets side by side, and the README table of it.

    python -m study.seeds --seeds 0,1,2,3,4,1337                   # the README's toy-preset table (results/seeds.json)
    python -m study.seeds --presets toy,toy-gdn --seeds 0,1,2      # side by side (results/seeds-toy+toy-gdn.json)
    python -m study.seeds --report [--presets toy,toy-gdn]         # no runs: the README block from the stored JSON

Each (preset, seed) is `python train.py --preset P --seed=S --out_dir=OUT/P-sS` in its own process, its log in
OUT/P-sS/train.log, --jobs at a time with cores // jobs threads each (default: one run per core, 1 thread each); a
run whose folder already holds the eval.json of the same command is reused. The command, the machine and the thread
count are stored with every eval.json in
results/seeds*.json, and the table is written into README.md between <!-- seeds:P1,P2:start --> and
<!-- seeds:P1,P2:end --> (the presets as given); without those markers it is printed. Several presets: paired by
seed (the seed fixes the data stream and the NIAH prompts), the difference to the first preset with the study's one
verdict rule (study/verdict.py).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study.report import update_readme
from study.verdict import RULE, interval, mean_sd, paired

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"S": "S (one needle; a random value word: 0.8%)",   # the toy's chance levels with 4 needles
            "MK": "MK (one of 4 keys asked; a random one of the 4 needle values: 25%)",
            "MQ": "MQ (all 4 keys asked; copying every needle value in any order: 100%)",
            "MV": "MV (4 values of one key; the same copy: 100%)"}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="toy", help="train.py presets, comma-separated (the first is the reference)")
    p.add_argument("--seeds", default="0,1,2,3,4,1337", help="seeds, comma-separated")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, cores // jobs threads each (default: "
                   "one per core, so every run has 1 thread: the same float summation order on any machine)")
    p.add_argument("--out_dir", default="out/seeds", help="the runs, one folder each")
    p.add_argument("--train_flags", default="", help="more train.py flags for every run, space-separated "
                   "(a smoke run: \"--warmup_steps=4 --max_steps=2 --eval_examples=2\")")
    p.add_argument("--json", default=None, help="default results/seeds.json for the toy preset alone, else "
                   "results/seeds-P1+P2.json")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--report", action="store_true", help="no runs: rewrite the README block from --json")
    args = p.parse_args(argv)
    args.presets = [s for s in args.presets.split(",") if s]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.presets or not args.seeds or (args.jobs is not None and args.jobs < 1):
        p.error("--presets and --seeds need at least one entry and --jobs must be positive")
    args.json = Path(args.json or ROOT / "results" / ("seeds.json" if args.presets == ["toy"] else
                                                      f"seeds-{'+'.join(args.presets)}.json"))
    return args


def machine():
    """The CPU, its cores, torch and its CPU capability: what every timing and float summation order depends on."""
    import torch
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def run_one(preset, seed, out_dir, threads, flags=()):
    """train.py --preset P --seed=S [flags] in its own process -> dict(command, eval (its eval.json), wall_s,
    threads, reused)."""
    folder = Path(out_dir) / f"{preset}-s{seed}"
    argv = ["train.py", f"--preset={preset}", f"--seed={seed}", f"--out_dir={folder}", *flags]
    command = shlex.join(["python", *argv])
    done = folder / "run.json"
    if done.exists() and json.loads(done.read_text()).get("command") == command and (folder / "eval.json").exists():
        return dict(json.loads(done.read_text()), reused=True)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    t0 = time.time()
    with open(folder / "train.log", "w") as log:
        code = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv[1:]], env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{command} failed with status {code}; see {folder / 'train.log'}")
    result = dict(command=command, eval=json.loads((folder / "eval.json").read_text()), wall_s=time.time() - t0,
                  threads=threads)
    done.write_text(json.dumps(result, indent=1))
    return dict(result, reused=False)


def run_all(args):
    cores = os.cpu_count() or 1
    jobs = args.jobs or cores
    threads = max(1, cores // jobs)
    pairs = [(p, s) for p in args.presets for s in args.seeds]
    print(f"{len(pairs)} runs, {jobs} at a time, {threads} thread(s) each; logs in {args.out_dir}/P-sS/train.log",
          flush=True)
    with ThreadPoolExecutor(jobs) as pool:    # each run is its own process; the threads only wait for them
        results = list(pool.map(lambda ps: run_one(*ps, args.out_dir, threads, args.train_flags.split()), pairs))
    return dict(presets=args.presets, seeds=args.seeds, jobs=jobs, threads=threads, machine=machine(),
                runs={f"{p}-s{s}": dict(r, preset=p, seed=s) for (p, s), r in zip(pairs, results)})

# ----------------------------------------------------------------------------------------------- the table


def cells(run):
    """{"S@256": fraction, ...} of one run's eval.json, in its order."""
    return {k.removeprefix("niah_"): v for k, v in run["eval"].items() if k.startswith("niah_")}


def pm(xs, digits=1):
    m, sd = mean_sd(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(res):
    """The README block (markdown) of a stored seeds JSON."""
    presets, seeds, runs = res["presets"], res["seeds"], res["runs"]
    keys = list(cells(runs[f"{presets[0]}-s{seeds[0]}"]))
    lengths = list(dict.fromkeys(k.split("@")[1] for k in keys))
    variants = list(dict.fromkeys(k.split("@")[0] for k in keys))

    def niah(p, key):   # percent per seed; key "average": the mean over every cell
        def one(c):
            return 100 * (sum(c.values()) / len(c) if key == "average" else c[key])
        return [one(cells(runs[f"{p}-s{s}"])) for s in seeds]
    walls = [r["wall_s"] for r in runs.values()]
    how = (f"`{res['command']}`: {len(runs)} runs of `train.py`, {res['jobs']} at a time with {res['threads']} "
           f"thread(s) each on {res['machine']}; {min(walls):.0f}-{max(walls):.0f} s per run. NIAH percent, "
           f"{', '.join(lengths)} tokens, mean ± sd over the {len(seeds)} seeds ({', '.join(map(str, seeds))})")
    if len(presets) == 1:
        p = presets[0]
        out = [how + ":", "", f"| variant (4 needles; chance) | {' | '.join(lengths)} |",
               "|---|" + "---|" * len(lengths)]
        out += [f"| {VARIANTS.get(v, v)} | " + " | ".join(pm(niah(p, f"{v}@{n}")) for n in lengths) + " |"
                for v in variants]
        avg, mk = niah(p, "average"), niah(p, f"MK@{lengths[0]}") if "MK" in variants else None
        m = mean_sd(avg)[0]
        per_seed = ", ".join(f"{s}: " + (f"{mk[i]:.1f} / " if mk else "") + f"{avg[i]:.1f}"
                             for i, s in enumerate(seeds))
        out += ["", f"Per seed ({f'MK@{lengths[0]} / ' if mk else ''}NIAH average): {per_seed}; NIAH average "
                f"{pm(avg)} (mean ± sd), every seed within {max(abs(a - m) for a in avg):.1f} points of the mean."]
        return "\n".join(out) + "\n"
    ref = presets[0]
    out = [how + "; the difference to " + ref + " paired by seed, mean and 95% interval (" + RULE + "):", "",
           "| setting | " + " | ".join(f"{p}, mean ± sd" for p in presets) + " | " +
           " | ".join(f"{p} − {ref} [95% interval]" for p in presets[1:]) + " |",
           "|---|" + "---|" * (2 * len(presets) - 1)]
    for key in keys + ["average"]:
        diffs = [paired([b - a for a, b in zip(niah(ref, key), niah(p, key))]) for p in presets[1:]]
        out.append(f"| {key} | " + " | ".join(pm(niah(p, key)) for p in presets) + " | " +
                   " | ".join(interval(d) for d in diffs) + " |")
    for p in presets[1:]:
        v = paired([b - a for a, b in zip(niah(ref, "average"), niah(p, "average"))])
        loss = [[runs[f"{q}-s{s}"]["eval"]["val_loss"] for s in seeds] for q in (ref, p)]
        wall = [mean_sd([runs[f"{q}-s{s}"]["wall_s"] for s in seeds])[0] for q in (ref, p)]
        out += ["", f"On the NIAH average, {p} is **{v['word']}** {ref} ({p} − {ref} {interval(v)} points); "
                f"validation loss {pm(loss[1], 4)} vs {pm(loss[0], 4)} (mean ± sd); mean wall time per run "
                f"{wall[1]:.0f} s vs {wall[0]:.0f} s."]
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.report:
        if not args.json.exists():
            raise SystemExit(f"study.seeds --report: error: {args.json} does not exist; run without --report first")
        res = json.loads(args.json.read_text())
    else:
        res = dict(command=shlex.join(["python", "-m", "study.seeds", *(sys.argv[1:] if argv is None else argv)]),
                   **run_all(args))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    block, name = table(res), "seeds:" + ",".join(res["presets"])
    if not update_readme(args.readme, block, name):
        print(block + f"\n(no <!-- {name}:start --> / <!-- {name}:end --> lines in {args.readme}: add them where "
              "the table belongs and rerun with --report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
