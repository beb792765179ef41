"""The chunked torch delta rule against the recurrent reference: values, final state, all five gradients."""
import pytest
import torch
import torch.nn.functional as F

from kernels import delta_rule, resolve_backend
from kernels.chunked import chunked_delta_rule


def make_inputs(B, T, H, K, V, dtype=torch.float32, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    beta = torch.rand(B, T, H, generator=g).to(dtype)
    s0 = torch.randn(B, H, K, V, generator=g) if h0 else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, beta, s0)]


def run(backend, inputs, chunk_size=64):
    q, k, v, beta, s0 = inputs
    o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, backend=backend,
                      chunk_size=chunk_size)
    g = torch.Generator().manual_seed(1)
    loss = (o.float() * torch.randn(o.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
    return o.float(), s, grads


# fp32: tight tolerance (max abs error 2e-5 on O(1) values; the two forms differ only by summation order)
@pytest.mark.parametrize("T,K,V,C", [(1, 16, 16, 64), (17, 32, 16, 64), (100, 16, 32, 32), (130, 64, 64, 64),
                                     (64, 128, 128, 64), (45, 16, 16, 16)])
@pytest.mark.parametrize("h0", [True, False])
def test_chunked_matches_recurrent_fp32(T, K, V, C, h0):
    inputs = make_inputs(2, T, 2, K, V, h0=h0)
    o_ref, s_ref, g_ref = run("recurrent", inputs)
    o, s, g = run("torch", inputs, chunk_size=C)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):  # dq, dk, dv, dbeta, (dh0)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def test_chunked_bf16_inputs():
    """bf16 inputs, fp32 state: relative RMS error against the fp32 reference below 1e-2 (fla uses 6e-3 / 8e-3)."""
    ref = make_inputs(1, 150, 2, 32, 32)
    o_ref, s_ref, g_ref = run("recurrent", ref)
    low = [t.detach().to(torch.bfloat16).requires_grad_() if t is not None else None for t in ref[:4]]
    o, s, g = run("torch", low + [ref[4].detach().clone().requires_grad_()])
    assert o.dtype == torch.float32 and s.dtype == torch.float32  # run() casts o; the state stays fp32
    assert rel_rms(o, o_ref) < 1e-2 and rel_rms(s, s_ref) < 1e-2
    for a, b in zip(g, g_ref):
        assert rel_rms(a, b) < 1e-2


def test_snapshots_equal_prefix_final_states():
    q, k, v, beta, s0 = make_inputs(2, 90, 2, 16, 16)
    pos = torch.tensor([[0, 31, 32, 89], [5, 40, 63, 64]])
    _, _, snaps = chunked_delta_rule(q, k, v, beta, initial_state=s0, chunk_size=32, snapshot_at=pos)
    for b in range(2):
        for p, t in enumerate(pos[b].tolist()):
            sl = slice(b, b + 1)
            _, s = delta_rule(q[sl, :t + 1], k[sl, :t + 1], v[sl, :t + 1], beta[sl, :t + 1], initial_state=s0[sl],
                              output_final_state=True, backend="recurrent")
            torch.testing.assert_close(snaps[b, p], s[0], atol=2e-5, rtol=1e-5)


def test_backend_errors():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("cuda-magic", x)
    assert resolve_backend("auto", x) == "torch"  # CPU tensors never pick Triton
