"""The chunked torch delta rule against the recurrent reference: values, final state, all five gradients; and the
snapshots (the state after chosen positions) of both, against the loop run over each prefix."""
import pytest
import torch
import torch.nn.functional as F

from kernels import delta_rule, resolve_backend


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
    # gradients sum over all later positions (up to T = 130 terms) in another order than the forward's sums: 5x
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


def prefix_states(q, k, v, beta, s0, positions):
    """[B, P, H, K, V]: the final state of the recurrent loop run over tokens 0..t, t = positions[b, p]."""
    rows = []
    for b, row in enumerate(positions.tolist()):
        for t in row:
            sl = slice(b, b + 1)
            _, s = delta_rule(q[sl, :t + 1], k[sl, :t + 1], v[sl, :t + 1], beta[sl, :t + 1],
                              initial_state=None if s0 is None else s0[sl], output_final_state=True,
                              backend="recurrent")
            rows.append(s[0])
    return torch.stack(rows).view(*positions.shape, *rows[0].shape)


# t = 0, last / first rows of chunks (31, 32, 63, 64), inside (5, 40), T-1 = 89 in a partial chunk, a repeat
POSITIONS = torch.tensor([[0, 31, 32, 89, 31], [5, 40, 63, 64, 89]])


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize("h0", [True, False])
@pytest.mark.parametrize("defer", [False, True], ids=["direct", "deferred"])
def test_snapshots_equal_prefix_final_states(backend, h0, defer):
    """The state after position t from one pass equals the loop's state after t: values and the gradients of
    q, k, v, beta, h0 through the snapshots and the output together."""
    inputs = make_inputs(2, 90, 2, 16, 16, h0=h0)
    q, k, v, beta, s0 = inputs
    leaves = [t for t in inputs if t is not None]
    g = torch.Generator().manual_seed(2)
    do, ds = torch.randn(2, 90, 2, 16, generator=g), torch.randn(2, 5, 2, 16, 16, generator=g)
    o, final, snaps = delta_rule(q, k, v, beta, initial_state=s0, backend=backend, chunk_size=32,
                                 snapshot_at="defer" if defer else POSITIONS)
    snaps = snaps(POSITIONS) if defer else snaps
    assert final is None and snaps.shape == (2, 5, 2, 16, 16) and snaps.dtype == torch.float32
    grads = torch.autograd.grad((o * do).sum() + (snaps * ds).sum(), leaves)
    o_ref, _ = delta_rule(q, k, v, beta, initial_state=s0, backend="recurrent")
    ref = prefix_states(q, k, v, beta, s0, POSITIONS)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (ref * ds).sum(), leaves)
    # fp32, summation order only, as in test_chunked_matches_recurrent_fp32 (states 2e-5, gradients 1e-4)
    torch.testing.assert_close(snaps, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):  # dq, dk, dv, dbeta, (dh0)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_snapshot_positions_are_checked(backend):
    q, k, v, beta, _ = make_inputs(1, 10, 1, 16, 16, h0=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        delta_rule(q, k, v, beta, backend=backend, snapshot_at=torch.tensor([[10]]))
    with pytest.raises(ValueError, match="integer tensor"):
        delta_rule(q, k, v, beta, backend=backend, snapshot_at=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="'defer'"):
        delta_rule(q, k, v, beta, backend=backend, snapshot_at="later")
    _, _, take = delta_rule(q, k, v, beta, backend=backend, snapshot_at="defer")
    with pytest.raises(ValueError, match="lie in"):
        take(torch.tensor([[-1]]))
    assert take(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 1, 16, 16)


def test_snapshots_run_in_fp32_under_autocast():
    """bf16 autocast (as in training) leaves the delta rule and its snapshots in fp32."""
    q, k, v, beta, _ = make_inputs(1, 40, 1, 16, 16, h0=False)
    pos = torch.tensor([[7, 39]])
    _, _, plain = delta_rule(q, k, v, beta, backend="torch", chunk_size=16, snapshot_at=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, auto = delta_rule(q, k, v, beta, backend="torch", chunk_size=16, snapshot_at=pos)
    assert auto.dtype == torch.float32
    # autocast must not touch the fp32 delta rule: the same operations, so assert_close's fp32 defaults
    torch.testing.assert_close(auto, plain)


def test_backend_errors(monkeypatch):
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("cuda-magic", x)
    monkeypatch.delenv("REFINE_DELTA_BACKEND", raising=False)
    assert resolve_backend("auto", x) == "torch"  # CPU tensors never pick Triton
    monkeypatch.setenv("REFINE_DELTA_BACKEND", "recurrent")
    assert resolve_backend("auto", x) == "recurrent"  # the environment forces "auto" ...
    assert resolve_backend("torch", x) == "torch"     # ... but not an explicit choice


def test_model_snapshots_follow_the_forced_backend(monkeypatch):
    """DeltaNet snapshots go through kernels.delta_rule: REFINE_DELTA_BACKEND=recurrent runs the loop (seen by a spy)
    and gives the same states as the torch chunked path."""
    import kernels
    from model import FastWeightLM, ModelConfig
    calls, loop = [], kernels.recurrent_delta_rule
    monkeypatch.setattr(kernels, "recurrent_delta_rule", lambda *a: calls.append(a[7]) or loop(*a))
    x = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([[0, 20], [8, 9]])
    states = []
    for forced in ("torch", "recurrent"):
        monkeypatch.setenv("REFINE_DELTA_BACKEND", forced)
        torch.manual_seed(0)
        model = FastWeightLM(ModelConfig(arch="deltanet", vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                         num_heads=2, chunk_size=8)).double()
        states.append([s["S"] for s in model(x, snapshot_at=pos).snapshots])
    assert calls == ["defer", "defer"]  # one deferred pass per layer, only when forced
    for a, b in zip(*states):
        # float64 model: the deferred recurrent pass and the chunked one differ in summation order (~1e-14)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------- Gated DeltaNet
# g [B, T, HV]: the per-token log-decay. Three regimes: zero (must be DeltaNet), mild, and strong (down to -30 per
# token: a mild random gate hides chunk-boundary and dg bugs, fla issue #891). HV = 2H exercises GVA.
DECAYS = {"zero": 0.0, "mild": 0.5, "strong": 30.0}  # g ~ U(-x, 0)


def gated_inputs(B, T, H, HV, K, V, decay, dtype=torch.float64, seed=0):
    """Leaves q, k [B, T, H, K], v [B, T, HV, V], beta [B, T, HV], g [B, T, HV] ~ U(-DECAYS[decay], 0), s0."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v, beta = torch.randn(B, T, HV, V, generator=gen), torch.rand(B, T, HV, generator=gen)
    g, s0 = -DECAYS[decay] * torch.rand(B, T, HV, generator=gen), torch.randn(B, HV, K, V, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, beta, g, s0)]


def run_gated(backend, inputs, chunk_size=64, positions=None):
    """Output, final state (and snapshots at positions) and the gradients of q, k, v, beta, g, s0 of a random loss."""
    q, k, v, beta, g, s0 = inputs
    o, s, *snaps = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, backend=backend,
                              chunk_size=chunk_size, snapshot_at=positions, g=g)
    outs = [o, s, *snaps]
    gen = torch.Generator().manual_seed(1)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in outs)
    return outs, torch.autograd.grad(loss, [x for x in inputs if x is not None])


# fp64: the chunked and the loop form differ by summation order (~1e-16 per operation) and by exp(G_i - G_j) taken
# from a difference of cumsums (|G| <= 30 * 64 = 1920: 1920 * 1.1e-16 = 2e-13 relative in a decay factor); gradients
# sum up to T = 130 such terms. 1e-10 leaves three orders of magnitude above that and catches any real error.
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("T,C", [(1, 16), (45, 16), (100, 32), (130, 64)])
@pytest.mark.parametrize("groups", [1, 2], ids=["HV=H", "HV=2H"])
def test_gated_chunked_matches_recurrent_fp64(decay, T, C, groups):
    inputs = gated_inputs(2, T, 2, 2 * groups, 16, 8, decay)
    (o_ref, s_ref), g_ref = run_gated("recurrent", inputs)
    (o, s), grads = run_gated("torch", inputs, chunk_size=C)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "ds0"), grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_zero_gate_is_deltanet(backend):
    """g = 0 multiplies by exp(0) = 1, which is exact: the same values as g = None (DeltaNet) to the bit; the
    gradients add the (exactly zero-decay) paths in another order: fp32 summation-order noise, 2e-5 / 1e-4 as above."""
    q, k, v, beta, g, s0 = gated_inputs(2, 70, 2, 2, 16, 16, "zero", dtype=torch.float32)
    outs = [run_gated(backend, [q, k, v, beta, gate, s0], chunk_size=32) for gate in (g, None)]
    for a, b in zip(outs[0][0], outs[1][0]):  # output, final state
        assert torch.equal(a, b)
    for a, b in zip(outs[0][1][:4] + outs[0][1][5:], outs[1][1]):  # dq, dk, dv, dbeta, ds0 (dg has no partner)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_gva_value_head_j_reads_qk_head_j_over_groups(backend):
    """HV = 3H: value head j of one call equals an H = 1 run of the loop on q/k head j // 3 alone (fp64: 1e-12
    covers the summation order of the chunked form)."""
    q, k, v, beta, g, s0 = gated_inputs(1, 40, 2, 6, 8, 8, "mild")
    o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, backend=backend, chunk_size=16, g=g)
    for j in range(6):
        qk, vh = slice(j // 3, j // 3 + 1), slice(j, j + 1)
        o_j, s_j = delta_rule(q[:, :, qk], k[:, :, qk], v[:, :, vh], beta[:, :, vh], initial_state=s0[:, vh],
                              output_final_state=True, backend="recurrent", g=g[:, :, vh])
        torch.testing.assert_close(o[:, :, vh], o_j, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(s[:, vh], s_j, atol=1e-12, rtol=1e-12)


def gated_prefix_states(q, k, v, beta, g, s0, positions):
    """[B, P, HV, K, V]: the final state of the gated loop run over tokens 0..t, t = positions[b, p]."""
    rows = []
    for b, row in enumerate(positions.tolist()):
        for t in row:
            sl, keep = slice(b, b + 1), slice(0, t + 1)
            _, s = delta_rule(q[sl, keep], k[sl, keep], v[sl, keep], beta[sl, keep], initial_state=s0[sl],
                              output_final_state=True, backend="recurrent", g=g[sl, keep])
            rows.append(s[0])
    return torch.stack(rows).view(*positions.shape, *rows[0].shape)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
@pytest.mark.parametrize("decay", ["mild", "strong"])
def test_gated_snapshots_equal_prefix_states(backend, decay):
    """The state after the first token, the last and first rows of chunks, a row inside and the last token, from
    one pass, equals the gated loop's state after that prefix: values and all gradients (dg included) through the
    snapshots and the output (fp64, tolerance as in test_gated_chunked_matches_recurrent_fp64)."""
    inputs = gated_inputs(2, 90, 1, 2, 16, 8, decay)
    gen = torch.Generator().manual_seed(2)
    do, ds = torch.randn(2, 90, 2, 8, generator=gen).double(), torch.randn(2, 5, 2, 16, 8, generator=gen).double()
    q, k, v, beta, g, s0 = inputs
    o, _, snaps = delta_rule(q, k, v, beta, initial_state=s0, backend=backend, chunk_size=32, snapshot_at=POSITIONS,
                             g=g)
    grads = torch.autograd.grad((o * do).sum() + (snaps * ds).sum(), inputs)
    o_ref, _ = delta_rule(q, k, v, beta, initial_state=s0, backend="recurrent", g=g)
    ref = gated_prefix_states(q, k, v, beta, g, s0, POSITIONS)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (ref * ds).sum(), inputs)
    torch.testing.assert_close(snaps, ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(("dq", "dk", "dv", "dbeta", "dg", "ds0"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_step_is_the_matrix_form(gated):
    """One step of the loop is S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t
    (Gated DeltaNet's recurrence as a matrix product: the decay first, the error read from the decayed state;
    g = None is DeltaNet, g = 0). fp64 and a handful of operations on O(1) values: 1e-12."""
    from kernels.recurrent import delta_rule_step
    gen = torch.Generator().manual_seed(3)
    S, q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                  [(2, 3, 4, 5), (2, 3, 4), (2, 3, 4), (2, 3, 5)])
    beta, g = torch.rand(2, 3, generator=gen, dtype=torch.float64), -torch.rand(2, 3, generator=gen).double()
    S_t, o_t = delta_rule_step(S, q, k, v, beta, g if gated else None)
    g = g if gated else torch.zeros_like(g)
    kk = torch.einsum("bhk,bhl->bhkl", k, k)                                           # k k^T  [B, H, K, K]
    eye = torch.eye(4, dtype=torch.float64)
    want = g.exp()[..., None, None] * (eye - beta[..., None, None] * kk) @ S + \
        beta[..., None, None] * torch.einsum("bhk,bhv->bhkv", k, v)
    torch.testing.assert_close(S_t, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(o_t, torch.einsum("bhkv,bhk->bhv", want, q), atol=1e-12, rtol=1e-12)


def test_gated_shapes_are_checked():
    q, k, v, beta, g, _ = gated_inputs(1, 5, 2, 4, 8, 8, "mild")
    with pytest.raises(ValueError, match="HV a multiple of H"):
        delta_rule(q, k, v[:, :, :3], beta[:, :, :3], g=g[:, :, :3])
    with pytest.raises(ValueError, match="beta and g"):
        delta_rule(q, k, v, beta, g=g[:, :, :2])
