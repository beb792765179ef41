"""The toy study of the paper's comparison (SFT vs REFINE), run as `python -m study.reproduce`: the runs
(reproduce.py, experiments.py), the REFINE diagnostics (diagnose.py) and the report and figures (report.py)."""
