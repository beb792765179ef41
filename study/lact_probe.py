"""Why a tiny LaCT does or does not recall: probes of its fast-weight memory (README: the toy LaCT).

    python -m study.lact_probe                       # the memory probes on the toy-lact model's initial weights
    python -m study.lact_probe --ckpt out/toy-lact   # also the inner learning rates a trained model uses

1. Update size: |dW1| / |W1| of one chunk update at the base inner lr 1e-3, for the 760M model (2048-token chunks,
   384-dim heads) and the toy (16-token chunks, 64-dim heads).
2. Storage: one chunk of 16 (key, value) pairs written at inner lr eta (every token), then N chunks of other pairs;
   is each written key's own value the best cosine match of f_W(key) among the 16 values? (chance 1/16)
3. Selective writing: 4 pairs at eta_w in a chunk whose other tokens and the N chunks after it write at eta_f (what
   a model can learn through its per-token rates); best match among the 4 values (chance 1/4).
Keys are made as the mixer makes them (silu, then L2), values are silu of Gaussians; momentum gate 0.5; the update
is lact.fast_weight_update itself (momentum, row renormalisation). 4. With --ckpt: per layer, the inner lr
softplus(lr_proj(x) + inv_softplus(base_lr)) over 16 training documents of 256 tokens, and |dW| / |W| per update.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import data
import lact
from model import MODEL_PRESETS, build_model


def memory(mix, eta_w, eta_f, n_write, distractors, batch=256, seed=0):
    """Share of written keys whose own value is the best match of f_W(key) among the n_write written values, after
    one chunk (n_write pairs at eta_w, the rest at eta_f) and `distractors` chunks at eta_f. Also |dW1|/|W1|."""
    gen = torch.Generator().manual_seed(seed)
    C, d = mix.chunk, mix.fw_dim
    pairs = lambda: (F.normalize(F.silu(torch.randn(batch, 1, C, d, generator=gen)), dim=-1),     # [B, 1, C, d]
                     F.silu(torch.randn(batch, 1, C, d, generator=gen)))
    with torch.no_grad():
        w_init = tuple(w[:1] for w in mix.initial_weights())                                      # head 0
        norms = tuple(w.norm(dim=-1, keepdim=True) for w in w_init)
        w = tuple(wi.expand(batch, *wi.shape) for wi in w_init)
        m = tuple(torch.zeros_like(wi) for wi in w)
        gate = torch.full((batch, 1, C, 1), 0.5)
        k, v = pairs()
        lr = torch.full((batch, 1, C, 3), eta_f)
        lr[:, :, :n_write] = eta_w
        w1, m = lact.fast_weight_update(w, m, k, v, lr, gate, norms, False)
        rel = ((w1[1] - w[1]).norm() / w[1].norm()).item()
        w = w1
        for _ in range(distractors):
            w, m = lact.fast_weight_update(w, m, *pairs(), torch.full((batch, 1, C, 3), eta_f), gate, norms, False)
        out = lact.swiglu_apply(*w, k[:, :, :n_write])                                           # [B, 1, n, d]
        sim = F.normalize(out, dim=-1) @ F.normalize(v[:, :, :n_write], dim=-1).transpose(-1, -2)  # [B, 1, n, n]
        return (sim.argmax(-1) == torch.arange(n_write)).float().mean().item(), rel


def trained_rates(path, n_docs=16, seq_len=256):
    """Per layer: the inner lrs over n_docs training documents (mean, median, 90th percentile, max), and the mean
    |dW|/|W| (W0, W1, W2) of the chunk updates."""
    from evaluate import load_checkpoint
    model, tok, _ = load_checkpoint(path)
    rates, rel, update = {}, [], lact.fast_weight_update

    def spy(w, m, *args):
        new_w, new_m = update(w, m, *args)
        rel.append([((a - b).norm() / b.norm()).item() for a, b in zip(new_w, w)])
        return new_w, new_m
    for i, layer in enumerate(model.model.layers):
        mix = layer.attn
        mix.lr_proj.register_forward_hook(
            lambda mod, inp, out, i=i, mix=mix: rates.setdefault(i, F.softplus(out + mix.base_lr_inv).flatten()))
    x = data.SyntheticData(tok, seq_len, seed=12345, n_needles=(2, 4), styles=("S", "MK", "MQ", "MV")).get_batch(n_docs)
    lact.fast_weight_update = spy
    try:
        with torch.no_grad():
            model(x[:, :-1])
    finally:
        lact.fast_weight_update = update
    for i, r in rates.items():
        print(f"  layer {i}: inner lr mean {r.mean():.3g}, median {r.median():.3g}, p90 {r.quantile(0.9):.3g}, "
              f"max {r.max():.3g}")
    print("  |dW|/|W| per chunk update (W0, W1, W2), mean:", ", ".join(f"{v:.2e}" for v in torch.tensor(rel).mean(0)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="*", default=[], help="trained toy-lact out_dirs (or checkpoint folders)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    toy = build_model("toy-lact").model.layers[0].attn
    print("1. |dW1|/|W1| of one chunk update at inner lr 1e-3:")
    for name in ("lact-760m", "toy-lact"):
        mix = lact.LaCTMixer(MODEL_PRESETS[name]) if name != "toy-lact" else toy
        ratio = memory(mix, 1e-3, 1e-3, mix.chunk, 0, batch=2)[1]                   # |dW1| / |W1|
        print(f"  {name} (chunk {mix.chunk}, head {mix.fw_dim}): {ratio:.2e}")
    print("2. one chunk of 16 pairs at eta, then N other chunks: own value is the best match (chance 6.2%)")
    for eta in (1e-3, 1e-2, 1e-1, 3e-1, 1.0):
        print(f"  eta {eta:<6g}" + "".join(f"  N={n}: {100 * memory(toy, eta, eta, toy.chunk, n)[0]:5.1f}%"
                                         for n in (0, 3, 15)))
    print("3. 4 pairs at eta_w, everything else at eta_f, N chunks later (chance 25%)")
    for eta_w in (1e-3, 0.3, 1.0):
        for eta_f in (0.0, 0.01, 0.1):
            print(f"  eta_w {eta_w:<6g} eta_f {eta_f:<5g}" +
                  "".join(f"  N={n}: {100 * memory(toy, eta_w, eta_f, 4, n)[0]:5.1f}%" for n in (0, 3, 15)))
    for path in args.ckpt:
        print(f"4. inner learning rates of {path}:")
        trained_rates(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
