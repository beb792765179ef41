"""plot.py: a training run's curves.png from metrics.jsonl, the phases marked (train.py draws it at every run's end:
test_train.py's dry runs)."""
import json

import plot


def test_curves_png_from_metrics_with_phases_and_a_resume(tmp_path):
    rows = [{"config": {}, "start_step": 0}]
    rows += [{"step": s, "phase": "warmup" if s <= 3 else "refine", "ntp_loss": 5.0 - 0.1 * s, "lr": 1e-3,
              "reward_mean": None if s <= 3 else 0.5 + 0.01 * s} for s in range(1, 6)]
    rows += [{"config": {}, "start_step": 4}, {"step": 5, "phase": "refine", "ntp_loss": 4.4, "lr": 1e-3,
                                               "reward_mean": 0.6}]   # a resume logs step 5 again
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    info = plot.plot_run(tmp_path)
    assert info["steps"] == 5 and info["phases"] == [("warmup", 1, 3), ("refine", 4, 5)]
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000   # a drawn figure, not an empty file


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2                          # no metrics.jsonl
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert plot.main([]) == 2 and "usage: python plot.py OUT_DIR" in capsys.readouterr().err
