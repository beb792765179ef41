import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: flat modules (model, kernels, ...)
# The tests use tiny tensors: one thread is as fast as two and does not spin when other processes share the cores.
torch.set_num_threads(1)
