#!/usr/bin/env python3
"""PyTorch reference timings for `nsa bench --torch bench/torch_reference.py`.

Usage: torch_reference.py KERNEL dtype=bf16 dim=size ...   ->  prints `torch_ms=<median ms>` last.
Each reference is the straightforward PyTorch formulation (gather + matmul + softmax, torch.topk, einsum),
on random inputs of the same shapes, timed with CUDA events after warm-up (median of the repetitions).
Large intermediates are processed in chunks so the 128K-context shapes fit in memory.
"""
import sys

import torch


def median_ms(fn, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def sparse_mla_prefill(d, dtype):
    s_q, h_q, s_kv, topk, d_qk, d_v = d["s_q"], d["h_q"], d["s_kv"], d["topk"], d["d_qk"], d["d_v"]
    q = torch.randn(s_q, h_q, d_qk, dtype=dtype, device="cuda")
    kv = torch.randn(s_kv, d_qk, dtype=dtype, device="cuda")
    idx = torch.randint(0, s_kv, (s_q, topk), device="cuda")
    scale = d_qk ** -0.5
    chunk = max(1, (1 << 30) // (topk * d_qk * 2 * 2))

    def run():
        for i in range(0, s_q, chunk):
            kv_g = kv[idx[i : i + chunk]]  # [c, topk, 576]
            s = torch.einsum("chd,ckd->chk", q[i : i + chunk], kv_g).float() * scale
            lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse[..., None]).to(dtype)
            torch.einsum("chk,ckd->chd", p, kv_g[..., :d_v])

    return median_ms(run, reps=5)


def indexer_logits(d, dtype):
    t, h, dd, s = d["t"], d["h"], d["d"], d["s"]
    q = torch.randn(t, h, dd, dtype=dtype, device="cuda")
    k = torch.randn(s, dd, dtype=dtype, device="cuda")
    w = torch.randn(t, h, device="cuda")
    pos = torch.arange(s - t, s, device="cuda")
    chunk = max(1, (1 << 31) // (h * s * 4))

    def run():
        for i in range(0, t, chunk):
            logits = torch.einsum("thd,sd->ths", q[i : i + chunk], k).float().relu_()
            score = torch.einsum("ths,th->ts", logits, w[i : i + chunk])
            mask = torch.arange(s, device="cuda")[None, :] > pos[i : i + chunk, None]
            score.masked_fill_(mask, float("-inf"))

    return median_ms(run, reps=5)


def topk(d, dtype):
    t, s, k = d["t"], d["s"], d["k"]
    scores = torch.randn(t, s, device="cuda")
    return median_ms(lambda: torch.topk(scores, min(k, s), dim=-1))


def rms_norm(d, dtype):
    x = torch.randn(d["rows"], d["hidden"], dtype=dtype, device="cuda")
    w = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    return median_ms(lambda: torch.nn.functional.rms_norm(x, (d["hidden"],), w, 1e-6), reps=50)


def layer_norm(d, dtype):
    x = torch.randn(d["rows"], d["hidden"], dtype=dtype, device="cuda")
    w = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    b = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    return median_ms(lambda: torch.nn.functional.layer_norm(x, (d["hidden"],), w, b, 1e-6), reps=50)


def silu_mul(d, dtype):
    x = torch.randn(d["tokens"], 2 * d["d"], dtype=dtype, device="cuda")
    n = d["d"]
    return median_ms(lambda: torch.nn.functional.silu(x[:, :n]) * x[:, n:], reps=50)


def main():
    kernel = sys.argv[1]
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    dtype = torch.bfloat16 if args.pop("dtype", "bf16") == "bf16" else torch.float32
    dims = {k: int(v) for k, v in args.items()}
    fn = globals().get(kernel)
    if fn is None:
        sys.exit(f"no PyTorch reference for {kernel}")
    print(f"torch_ms={fn(dims, dtype):.4f}")


if __name__ == "__main__":
    main()
