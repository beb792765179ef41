"""`bench.py --readme`: the README's Benchmarks table (and results/bench.json) from one run's `name: value` lines;
`bench.py gpu-readme`: its GPU table (and results/gpu.json) from the gpu.json of a `bench.py gpu` run."""
import json
import re
from pathlib import Path

from benchmarks.common import ROOT, fail, write_whole
from benchmarks.cpu import PIECES


TARGETS = {"recurrent_over_chunked": ">= 20", "gated_recurrent_over_chunked": ">= 20",
           "decode_growth_deltanet": "<= 1.25", "decode_growth_gdn": "<= 1.25", "decode_growth_lact": "<= 1.25",
           "lact_recompute_over_incremental": ">= 20", "snapshot_over_ntp": "<= 1.25",
           "toy_snapshot_over_ntp": "<= 1.3", "reforward_over_snapshot": ">= 4",
           "gdn_snapshot_over_ntp": "<= 1.25", "gdn_reforward_over_snapshot": ">= 4",
           # the GPU run's (bench.py gpu): against fla at B=4 T=8192 H=16 K=V=128 bf16; the 1.3B models at 16K tokens
           "triton_over_fla_fwd_bwd": "<= 1.2", "triton_over_fla_gated_fwd_bwd": "<= 1.2",
           "triton_with_snapshots_over_fla_fwd_bwd": "<= 1.3", "deltanet_refine_over_ntp_step": "<= 1.3",
           "gdn_refine_over_ntp_step": "<= 1.3", "deltanet_refine_tokens_per_s": ">= 4000",
           "gdn_refine_tokens_per_s": ">= 4000"}   # the README's targets
GPU_NONE = ("No `python bench.py gpu` run has come back yet; `python bench.py gpu-readme --from=DIR/gpu.json` writes\n"
            "this block from one (and keeps the run in results/gpu.json).")   # the README's GPU block until then
LINE = re.compile(r"^([A-Za-z0-9_]+)(?: \((.*)\))?: (.*)$")   # report()'s `name (what): value`


class Tee:
    """sys.stdout that also keeps what is written (bench.py --readme)."""

    def __init__(self, out):
        self.out, self.parts = out, []

    def write(self, text):
        self.parts.append(text)
        return self.out.write(text)

    def flush(self):
        self.out.flush()


def readme_table(run):
    """The README's Benchmarks block from one run's stored output (results/bench.json: command, date, lines): the
    machine line, then a row per numeric `name: value` line; the pieces of a `<kind>_step_ms` line (its
    `<kind>_<piece>_ms` lines) go into that row's description."""
    rows = [m.groups() for m in map(LINE.match, run["lines"]) if m]       # (name, what or None, value)
    values = {name: value for name, _, value in rows}
    kinds = [name.removesuffix("step_ms") for name in values if name.endswith("_step_ms")]   # "ntp_", ...
    folded = {f"{kind}{piece}_ms" for kind in kinds for piece in (*PIECES, "other")}
    machine = values.get("machine") or ", ".join(values[key] for key in ("device", "versions") if key in values) \
        or "no machine line (bench.py refine prints it)"                   # the CPU run's, or the GPU run's
    out = [f"`{run['command']}` on {run['date']}: {machine}.", "", "| `bench.py` line | value | target |",
           "|---|---|---|"]
    for name, what, value in rows:
        if not _number(value) or name in folded:
            continue
        about = [what] if what else []
        kind = name.removesuffix("step_ms")
        parts = [f"{piece.replace('_', ' ')} {float(values[f'{kind}{piece}_ms']):.0f}" for piece in (*PIECES, "other")
                 if name.endswith("_step_ms") and f"{kind}{piece}_ms" in values]
        about += [", ".join(parts) + " ms"] if parts else []
        out.append(f"| `{name}`" + (f" ({'; '.join(about)})" if about else "") + f" | {float(value):.4g} | "
                   f"{TARGETS.get(name, '')} |")
    out += [""] + [f"`{name}`: {value}." for name, _, value in rows if name != "machine" and not _number(value)]
    return "\n".join(out).strip() + "\n"


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def run_record(command, lines):
    """A run as results/*.json and a GPU run's gpu.json keep it: its command, today's date (UTC) and its
    `name: value` lines."""
    from datetime import datetime, timezone
    return dict(command=command, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                lines=[line for line in lines if LINE.match(line)])


def publish(run, name, block, path, command):
    """results/<name> <- the run (write_whole: never half-written), then the README's `block` (between
    <!-- block:start --> and <!-- block:end -->) <- its table; `command` names the caller in the error."""
    from study.report import update_readme
    (path / "results").mkdir(exist_ok=True)
    write_whole(path / "results" / name, json.dumps(run, indent=1))
    if not update_readme(path / "README.md", readme_table(run), block):
        fail(f"{command}: error: no <!-- {block}:start --> / end lines in {path / 'README.md'}", 1)


def write_readme(argv, lines, path=ROOT):
    """--readme: store the run's `name: value` lines in results/bench.json and rewrite the README's Benchmarks table
    between <!-- benchmarks:start --> and <!-- benchmarks:end --> from it."""
    publish(run_record(" ".join(["python bench.py", *argv]), lines), "bench.json", "benchmarks", path,
            "bench.py --readme")


def write_gpu_readme(source, path=ROOT):
    """gpu-readme: the run that `python bench.py gpu --out=DIR` left in DIR/gpu.json (command, date, lines) ->
    results/gpu.json and the README's GPU table between <!-- gpu:start --> and <!-- gpu:end -->. A dry run (the CPU
    at tiny shapes) is refused: its figures are no GPU's."""
    try:
        run = json.loads(Path(source).read_text())
        ok = isinstance(run, dict) and {"command", "date", "lines"} <= set(run) and isinstance(run["lines"], list) \
            and all(isinstance(line, str) for line in [run["command"], run["date"], *run["lines"]])
    except (OSError, ValueError):
        ok = False
    if not ok:
        fail(f"bench.py gpu-readme: error: {source} is not the gpu.json of a `python bench.py gpu --out=DIR` run (a "
             f"JSON object with command, date and lines); give --from=DIR/gpu.json", 2)
    if "--dry-run" in run["command"].split():
        fail(f"bench.py gpu-readme: error: {source} is a dry run (the CPU at tiny shapes), not a GPU's figures; give "
             f"the gpu.json of `python bench.py gpu --out=DIR` on a GPU", 2)
    publish(run, "gpu.json", "gpu", path, "bench.py gpu-readme")
