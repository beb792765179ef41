import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: flat modules (model, kernels, ...)
# The tests use tiny tensors: one thread is as fast as two and does not spin when other processes share the cores.
# A thread count the user sets (OMP_NUM_THREADS) is kept: it changes how kernels split their sums, and the tests'
# tolerances must hold for it (the subprocess tests pass it on too).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
