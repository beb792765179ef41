"""Triton chunked delta rule (kernels/triton_delta.py) against the recurrent reference: output, final state and the
gradients of q, k, v, beta and the initial state.

Without CUDA the kernels run in Triton's CPU interpreter in fp32. triton.language reads TRITON_INTERPRET when it is
first imported, so the flag is set below before anything imports triton; if another test module imported triton
earlier in this process, the CPU tests rerun this file in a fresh process instead. With CUDA the same tests run
compiled in bf16 against the fp32 reference, with fla's tolerances.
Tolerances (relative RMS error, ||x - ref|| / ||ref||): fp32 interpreter 1e-4 for everything; bf16 on CUDA 6e-3
for the output and final state, 8e-3 for the gradients.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TRITON_IMPORTED_BEFORE_FLAG = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels import triton_delta as td  # noqa: E402
from kernels.recurrent import recurrent_delta_rule  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEEDS_FRESH_PROCESS = INTERPRET and TRITON_IMPORTED_BEFORE_FLAG  # the interpreter cannot run in this process
DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32-interpreter",
                 marks=[pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1 (set only when "
                                                                 "CUDA is absent)"),
                        pytest.mark.skipif(NEEDS_FRESH_PROCESS, reason="triton was imported before the interpreter "
                                           "flag: run by test_cpu_cases_in_fresh_process")]),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-3, 8e-3)}  # (output/state, gradients)
# (B, T, H, K, V, chunk, with initial state, return/backprop the final state)
CASES = [
    (2, 1, 2, 16, 16, 16, False, False),   # T = 1 < chunk, no state in or out
    (2, 20, 2, 16, 32, 16, True, True),    # T not a multiple of the chunk
    (1, 50, 2, 32, 16, 32, True, False),   # several chunks of 32, last one partial
    (1, 100, 2, 32, 32, 16, False, True),  # 7 chunks of 16
    (1, 37, 2, 20, 24, 16, True, True),    # head dims padded to 32 inside the kernel
    (1, 70, 1, 16, 16, 64, True, True),    # the default chunk of 64
]


def rel_rms(x, ref):
    """||x - ref|| / ||ref|| (root mean squares), computed in fp32."""
    x, ref = x.float(), ref.float()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make_inputs(B, T, H, K, V, with_h0, device, dtype, seed=0):
    """q, k [B, T, H, K] L2-normalised, v [B, T, H, V], beta [B, T, H] in (0, 1), h0 [B, H, K, V] or None."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.randn(B, T, H, generator=g).sigmoid()
    h0 = torch.randn(B, H, K, V, generator=g) if with_h0 else None
    return [None if x is None else x.to(device, dtype) for x in (q, k, v, beta, h0)]


def run_with_grads(fn, inputs, do, dht, output_final_state):
    """Forward fn on leaf copies of inputs, backprop <o, do> + <final, dht>; returns outputs then gradients."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, beta, h0 = leaves
    o, ht = fn(q, k, v, beta, None, h0, output_final_state)
    loss = (o.float() * do).sum() + ((ht * dht).sum() if output_final_state else 0.0)
    loss.backward()
    return [o, ht], [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("B,T,H,K,V,chunk,with_h0,final", CASES)
def test_matches_recurrent_values_and_grads(device, dtype, B, T, H, K, V, chunk, with_h0, final):
    inputs = make_inputs(B, T, H, K, V, with_h0, device, dtype)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=g).to(device)
    dht = torch.randn(B, H, K, V, generator=g).to(device)

    def fast(q, k, v, beta, scale, h0, out_final):
        return td.triton_delta_rule(q, k, v, beta, scale, h0, out_final, chunk_size=chunk)

    outs, grads = run_with_grads(fast, inputs, do, dht, final)
    ref_outs, ref_grads = run_with_grads(recurrent_delta_rule, [None if x is None else x.float() for x in inputs],
                                         do, dht, final)
    tol_out, tol_grad = TOL[dtype]
    assert outs[0].dtype == dtype and outs[0].shape == (B, T, H, V)
    assert rel_rms(outs[0], ref_outs[0]) < tol_out, "output"
    if final:
        assert outs[1].dtype == torch.float32 and outs[1].shape == (B, H, K, V)
        assert rel_rms(outs[1], ref_outs[1]) < tol_out, "final state"
    else:
        assert outs[1] is None
    for name, grad, ref in zip(("dq", "dk", "dv", "dbeta", "dh0"), grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == ref.shape, name
        assert rel_rms(grad, ref) < tol_grad, name


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_single_token_by_hand(device, dtype):
    # T = 1, q = k (unit norm), S_0 = 0: v' = beta v, S_1 = beta k v^T, o = scale beta (k . k) v = scale beta v.
    k = F.normalize(torch.arange(1.0, 17.0).reshape(1, 1, 1, 16), dim=-1).to(device, dtype)
    v = torch.linspace(-1.0, 1.0, 16).reshape(1, 1, 1, 16).to(device, dtype)
    beta = torch.full((1, 1, 1), 0.5, device=device, dtype=dtype)
    o, ht = td.triton_delta_rule(k, k, v, beta, scale=0.25, output_final_state=True, chunk_size=16)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(o.float(), 0.125 * v.float(), atol=tol)
    assert torch.allclose(ht, 0.5 * k[0, 0, 0].float()[:, None] * v[0, 0, 0].float()[None, :], atol=tol)


def test_rejects_bad_input():
    q = torch.zeros(1, 4, 2, 16)
    v, beta = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        td.triton_delta_rule(q, q, v, beta, chunk_size=48)
    with pytest.raises(ValueError, match="head dims"):
        td.triton_delta_rule(torch.zeros(1, 4, 2, 256), torch.zeros(1, 4, 2, 256), v, beta)
    with pytest.raises(ValueError, match="beta"):
        td.triton_delta_rule(q, q, v, torch.zeros(1, 4, 3))


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the interpreter runs in this process")
def test_cpu_cases_in_fresh_process():
    # Another module imported triton before TRITON_INTERPRET=1 was set: run this file where the flag comes first.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
