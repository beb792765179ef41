"""The learning curves of one training run: out_dir/curves.png from its metrics.jsonl, NTP loss, mean reward and
learning rate over the steps, with the warm-up and objective phases shaded. train.py draws it at the end of every
run; `python plot.py OUT_DIR` redraws it. Headless: matplotlib's Agg backend, imported only when drawing.
"""
import itertools
import json
import sys
from pathlib import Path

PANELS = (("ntp_loss", "NTP loss"), ("reward_mean", "mean reward"), ("lr", "learning rate"))
SHADES = {"warmup": "tab:gray", "refine": "tab:orange", "sft": "tab:blue"}


def plot_run(out_dir):
    """Draw out_dir/curves.png -> dict(path, steps, phases: [(phase, first step, last step)]). A resumed run logs
    some steps twice: the last row of each step counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = Path(out_dir) / "metrics.jsonl"
    if not log.is_file():
        raise ValueError(f"no metrics.jsonl in '{out_dir}'; pass the --out_dir of a training run")
    rows = {r["step"]: r for r in map(json.loads, log.read_text().splitlines()) if "step" in r}
    rows = [rows[s] for s in sorted(rows)]
    if not rows:
        raise ValueError(f"{log} holds no step rows yet")
    fig, axes = plt.subplots(len(PANELS), 1, sharex=True, figsize=(8, 6.5))
    runs = [list(run) for _, run in itertools.groupby(rows, key=lambda r: r["phase"])]   # consecutive rows, one phase
    spans = [(run[0]["phase"], run[0]["step"], run[-1]["step"]) for run in runs]         # (phase, first, last step)
    for ax, (key, label) in zip(axes, PANELS):
        have = [r for r in rows if r.get(key) is not None]
        ax.plot([r["step"] for r in have], [r[key] for r in have], lw=0.8, color="black")
        for phase, first, last in spans:
            ax.axvspan(first - 0.5, last + 0.5, color=SHADES[phase], alpha=0.15, lw=0, label=phase)   # one span each
        ax.set_ylabel(label)
        if not have:
            ax.text(0.5, 0.5, "no rollouts (next-token steps only)", transform=ax.transAxes, ha="center")
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"{out_dir}: " + ", then ".join(f"{p} {b - a + 1} steps" for p, a, b in spans))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "curves.png", dpi=80)
    plt.close(fig)
    return dict(path=str(Path(out_dir) / "curves.png"), steps=len(rows), phases=spans)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1 or argv[0].startswith("-"):
            raise ValueError("usage: python plot.py OUT_DIR   (redraws OUT_DIR/curves.png from OUT_DIR/metrics.jsonl)")
        print(f"wrote {plot_run(argv[0])['path']}")
        return 0
    except ValueError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
