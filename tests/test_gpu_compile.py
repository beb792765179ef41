"""The GPU path checked without a GPU: every Triton kernel of kernels/, as its launcher would launch it at
DeltaNet-1.3B's head size (K = V = 128, chunk 64: plain, with snapshots, gated, gated with snapshots) and the gated
ones at Gated DeltaNet-1.3B's (K = 256, V = 512), compiles for sm_89 (L40 / RTX 4090: the smallest shared memory
per block of the supported cards, 99 KB) in bf16 and fp32 (fp16 has bf16's tile sizes), and fits.
`python bench.py compile` prints the full table: sm_80, sm_89 and sm_90 in bf16, fp16 and fp32.
Cost: ~70 compiles, about three minutes cold on 2 CPU cores (triton's cache makes a rerun take seconds)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend does not import here")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, torch
from benchmarks.gpu import compile_check
print(json.dumps(compile_check((89,), (torch.bfloat16, torch.float32))))
"""


def test_every_kernel_compiles_for_an_L40_and_fits():
    # a fresh process: the other Triton tests set TRITON_INTERPRET=1, which makes the kernels interpreter objects
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    defined = {m for f in (ROOT / "kernels").glob("*.py") for m in re.findall(r"^def (\w+_kernel)\(", f.read_text(),
                                                                                re.M)}
    for dtype in ("bfloat16", "float32"):
        for variant in ("plain", "gated", "gated_K256_V512"):  # every kernel is launched and compiled
            compiled = {r[2] for r in rows if r[1] == dtype and r[3] == variant}
            assert compiled == defined, (dtype, variant, defined ^ compiled)
    for sm, dtype, name, variant, shared, limit, regs, local, fits in rows:
        assert limit == 99 * 1024 and 0 < regs <= 255
        assert shared <= limit, f"{name} ({variant}, {dtype}) needs {shared} B of shared memory; an L40 has {limit}"
