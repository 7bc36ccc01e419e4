#!/usr/bin/env python3
"""PyTorch reference timings for `nsa bench --torch bench/torch_reference.py`.

Usage: torch_reference.py KERNEL dtype=bf16 dim=size ...   ->  prints `torch_ms=<median ms>` last.
Each reference is the straightforward PyTorch formulation (gather + matmul + softmax, torch.topk, einsum),
on random inputs of the same shapes, timed as `nsa bench` times ours: after warm-up, batches of back-to-back
launches lasting about `batch_ms` each (default 200), timed by CUDA events, the median batch per launch.
(Timing single launches with a sync after each, as before, let the GPU idle between them: under sustained
load the H200 reaches its 700 W cap and drops from 1980 to 1300-1700 MHz, so PyTorch ran at higher clocks
than our kernels.)
Large intermediates are processed in chunks so the 128K-context shapes fit in memory.
"""
import sys
import time

import torch


# Length of a timed batch in ms: `nsa bench --batch-ms` passes its own (`batch_ms=` argument).
BATCH_MS = 200.0


def median_ms(fn, warmup=2):
    """`nsa bench`'s method: after warm-up, batches of back-to-back launches lasting about BATCH_MS each
    (7 at most, about 2 s in all), each timed by device events; the median batch divided by its launches."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    single = max((time.perf_counter() - t0) * 1e3, 1e-3)
    per_batch = min(max(int(BATCH_MS / single), 1), 1000)
    batches = min(max(int(2000.0 / (single * per_batch)), 1), 7)
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_batch):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_batch)
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

    return median_ms(run)


def sparse_mla_decode(d, dtype):
    b, s_q, h_q, topk, max_pages, pages = d["b"], d["s_q"], d["h_q"], d["topk"], d["max_pages"], d["pages"]
    d_qk, d_v = d["d_qk"], d["d_v"]
    q = torch.randn(b, s_q, h_q, d_qk, dtype=dtype, device="cuda")
    cache = torch.randint(0, 0x7E, (pages, 64, 656), dtype=torch.uint8, device="cuda")
    cache[..., 512:528] = torch.tensor([0, 0, 0, 0x3C], dtype=torch.uint8, device="cuda").repeat(4)
    table = torch.randperm(pages, device="cuda")[: b * max_pages].view(b, max_pages).int()
    idx = torch.randint(0, max_pages * 64, (b, s_q, topk), device="cuda")
    scale = d_qk ** -0.5

    def run():
        page = torch.gather(table, 1, (idx // 64).view(b, -1)).view(b, s_q, topk)
        tok = cache[page.long(), (idx % 64).long()]  # [b, s_q, topk, 656]
        scales = tok[..., 512:528].contiguous().view(torch.float32)  # [b, s_q, topk, 4]
        latent = tok[..., :512].contiguous().view(torch.float8_e4m3fn).float()
        latent = (latent.view(b, s_q, topk, 4, 128) * scales[..., None]).view(b, s_q, topk, 512)
        rope = tok[..., 528:].contiguous().view(torch.bfloat16).float()
        kv = torch.cat([latent, rope], dim=-1).to(dtype)  # [b, s_q, topk, 576]
        s = torch.einsum("bqhd,bqkd->bqhk", q, kv).float() * scale
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).to(dtype)
        torch.einsum("bqhk,bqkd->bqhd", p, kv[..., :d_v])

    return median_ms(run)


def mla_decode(d, dtype):
    # Dense absorbed MLA decode over a paged bf16 cache: gather each sequence's pages, bmm, softmax, bmm.
    b, s_q, h_q, pages, max_pages = d["b"], d["s_q"], d["h_q"], d["pages"], d["max_pages"]
    d_qk, d_v = d["d_qk"], d["d_v"]
    s = 64 * max_pages
    q = torch.randn(b, s_q * h_q, d_qk, dtype=dtype, device="cuda")
    cache = torch.randn(pages, 64, d_qk, dtype=dtype, device="cuda")
    table = torch.randperm(pages, device="cuda")[: b * max_pages].view(b, max_pages)
    scale = d_qk ** -0.5

    def run():
        kv = cache[table].view(b, s, d_qk)
        p = torch.softmax(torch.bmm(q, kv.transpose(1, 2)).float() * scale, dim=-1).to(dtype)
        torch.bmm(p, kv[..., :d_v])

    return median_ms(run)


def mha_prefill(d, dtype):
    # Causal MHA with q/k dim 192 and v dim 128 (one sequence in the bench): PyTorch's SDPA picks its backend.
    t, h = d["t_q"], d["h"]
    q = torch.randn(1, h, t, 192, dtype=dtype, device="cuda")
    k = torch.randn(1, h, d["t_k"], 192, dtype=dtype, device="cuda")
    v = torch.randn(1, h, d["t_k"], 128, dtype=dtype, device="cuda")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return median_ms(lambda: sdpa(q, k, v, is_causal=True))


def fp8_kv_quantize(d, dtype):
    n = d["n"]
    kv = torch.randn(n, 576, dtype=dtype, device="cuda")

    def run():
        latent = kv[:, :512].float().view(n, 4, 128)
        amax = latent.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
        codes = (latent / scale).to(torch.float8_e4m3fn).view(torch.uint8).view(n, 512)
        out = torch.empty(n, 656, dtype=torch.uint8, device="cuda")
        out[:, :512] = codes
        out[:, 512:528] = scale.view(n, 4).contiguous().view(torch.uint8)
        out[:, 528:] = kv[:, 512:].to(torch.bfloat16).contiguous().view(torch.uint8)

    return median_ms(run)


def fp8_kv_dequantize(d, dtype):
    # SGLang-style widening of the 656-byte FP8 cache rows: e4m3 latent × group scale, bf16 rope.
    n = d["n"]
    cache = torch.randint(0, 0x7E, (n, 656), dtype=torch.uint8, device="cuda")
    cache[:, 512:528] = torch.rand(n, 4, device="cuda").view(torch.uint8)

    def run():
        latent = cache[:, :512].view(torch.float8_e4m3fn).float().view(n, 4, 128)
        scale = cache[:, 512:528].contiguous().view(torch.float32).view(n, 4, 1)
        out = torch.empty(n, 576, dtype=dtype, device="cuda")
        out[:, :512] = (latent * scale).view(n, 512).to(dtype)
        out[:, 512:] = cache[:, 528:].contiguous().view(torch.bfloat16).to(dtype)
        return out

    return median_ms(run)


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

    return median_ms(run)


def indexer_logits_fp8(d, dtype):
    # Decode over the paged FP8 K cache: gather each sequence's pages, widen e4m3 to bf16 times the token
    # scales, einsum, ReLU, weighted head sum, causal mask.
    t, h, dd, b, pages, max_pages = d["t"], d["h"], d["d"], d["b"], d["pages"], d["max_pages"]
    next_n = t // b
    s = 64 * max_pages
    q = torch.randint(0, 0x7E, (t, h, dd), dtype=torch.uint8, device="cuda")
    w = torch.randn(t, h, device="cuda")
    cache = torch.randint(0, 0x7E, (pages, 64 * (dd + 4)), dtype=torch.uint8, device="cuda")
    cache[:, 64 * dd :] = torch.tensor([0, 0, 0x80, 0x3B], dtype=torch.uint8, device="cuda").repeat(64)
    table = torch.randperm(pages, device="cuda")[: b * max_pages].view(b, max_pages)
    pos = (s - next_n + torch.arange(t, device="cuda") % next_n)

    def run():
        pg = cache[table]  # [b, max_pages, 64·(d + 4)]
        k = pg[..., : 64 * dd].reshape(b, s, dd).view(torch.float8_e4m3fn).to(torch.bfloat16)
        scales = pg[..., 64 * dd :].contiguous().view(torch.float32).reshape(b, s)
        qb = q.view(torch.float8_e4m3fn).to(torch.bfloat16).view(b, next_n, h, dd)
        logits = torch.einsum("bnhd,bsd->bnhs", qb, k).float() * scales[:, None, None, :]
        score = torch.einsum("bnhs,bnh->bns", logits.relu_(), w.view(b, next_n, h)).view(t, s)
        mask = torch.arange(s, device="cuda")[None, :] > pos[:, None]
        score.masked_fill_(mask, float("-inf"))

    return median_ms(run)


def fp8_act_quant(d, dtype):
    # DeepSeek's act_quant: per-128 amax, power-of-two scale, divide, cast to e4m3.
    tokens, hidden = d["tokens"], d["hidden"]
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")

    def run():
        g = x.float().view(tokens, hidden // 128, 128)
        s = g.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
        s = torch.exp2(torch.ceil(torch.log2(s)))
        (g / s).clamp(-448, 448).to(torch.float8_e4m3fn)

    return median_ms(run)


def moe_gate(d, dtype):
    # Hugging Face's DeepseekV3 noaux_tc routing (8 groups, 4 kept, top-8, normalized, × 2.5).
    tokens, experts, top_k = d["tokens"], d["experts"], d["top_k"]
    logits = torch.randn(tokens, experts, device="cuda")
    bias = torch.randn(experts, device="cuda") * 0.1

    def run():
        scores = logits.sigmoid()
        choice = scores + bias
        group_scores = choice.view(tokens, 8, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=4, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(tokens, 8, experts // 8).reshape(tokens, -1)
        masked = choice.masked_fill(~score_mask.bool(), 0.0)
        idx = torch.topk(masked, k=top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 2.5

    return median_ms(run)


def fp8_gemm(d, dtype):
    # Dequantize both e4m3 operands with their scales (per token group, per 128 × 128 weight block), bf16 matmul.
    m, n, k = d["m"], d["n"], d["k"]
    a = torch.randint(0, 0x7E, (m, k), dtype=torch.uint8, device="cuda")
    b = torch.randint(0, 0x7E, (n, k), dtype=torch.uint8, device="cuda")
    a_s = torch.rand(m, k // 128, device="cuda")
    b_s = torch.rand((n + 127) // 128, k // 128, device="cuda")

    def run():
        af = (a.view(torch.float8_e4m3fn).float().view(m, k // 128, 128) * a_s[..., None]).view(m, k)
        bs = b_s.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)
        bf = b.view(torch.float8_e4m3fn).float() * bs
        af.to(torch.bfloat16) @ bf.to(torch.bfloat16).T

    return median_ms(run)


def moe_experts(d, dtype):
    # Hugging Face's loop over experts: gather each expert's tokens, SwiGLU, index_add of weighted outputs.
    tokens, hidden, inter, experts, top_k = d["tokens"], d["hidden"], d["inter"], d["experts"], d["top_k"]
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    ids = torch.rand(tokens, experts, device="cuda").argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, device="cuda")
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=dtype, device="cuda") * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, dtype=dtype, device="cuda") * inter**-0.5

    def run():
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device="cuda")
        for e in range(experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            g, u = (x[tok] @ w13[e].T).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(g) * u) @ w2[e].T
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return out.to(dtype)

    return median_ms(run)


def gemm(d, dtype):
    m, n, k = d["m"], d["n"], d["k"]
    a = torch.randn(m, k, dtype=dtype, device="cuda")
    b = torch.randn(n, k, dtype=dtype, device="cuda")
    return median_ms(lambda: a @ b.T)


def moe_experts_fp8(d, dtype):
    # The expert loop on bf16 weights dequantized once per call from e4m3 with 128 × 128 block scales.
    tokens, hidden, inter, experts, top_k = d["tokens"], d["hidden"], d["inter"], d["experts"], d["top_k"]
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
    ids = torch.rand(tokens, experts, device="cuda").argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, device="cuda")
    w13 = torch.randint(0, 0x7E, (experts, 2 * inter, hidden), dtype=torch.uint8, device="cuda")
    w2 = torch.randint(0, 0x7E, (experts, hidden, inter), dtype=torch.uint8, device="cuda")
    s13 = torch.rand(experts, 2 * inter // 128, hidden // 128, device="cuda")
    s2 = torch.rand(experts, hidden // 128, inter // 128, device="cuda")

    def dequant(w, s):
        return (w.view(torch.float8_e4m3fn).float() * s.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(dtype)

    def run():
        out = torch.zeros(tokens, hidden, dtype=torch.float32, device="cuda")
        for e in range(experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            g, u = (x[tok] @ dequant(w13[e : e + 1], s13[e : e + 1])[0].T).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(g) * u) @ dequant(w2[e : e + 1], s2[e : e + 1])[0].T
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return out.to(dtype)

    return median_ms(run)


def topk(d, dtype):
    t, s, k = d["t"], d["s"], d["k"]
    scores = torch.randn(t, s, device="cuda")
    return median_ms(lambda: torch.topk(scores, min(k, s), dim=-1))


def rms_norm(d, dtype):
    x = torch.randn(d["rows"], d["hidden"], dtype=dtype, device="cuda")
    w = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    return median_ms(lambda: torch.nn.functional.rms_norm(x, (d["hidden"],), w, 1e-6))


def layer_norm(d, dtype):
    x = torch.randn(d["rows"], d["hidden"], dtype=dtype, device="cuda")
    w = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    b = torch.randn(d["hidden"], dtype=dtype, device="cuda")
    return median_ms(lambda: torch.nn.functional.layer_norm(x, (d["hidden"],), w, b, 1e-6))


def silu_mul(d, dtype):
    x = torch.randn(d["tokens"], 2 * d["d"], dtype=dtype, device="cuda")
    n = d["d"]
    return median_ms(lambda: torch.nn.functional.silu(x[:, :n]) * x[:, n:])


def main():
    kernel = sys.argv[1]
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    global BATCH_MS
    BATCH_MS = float(args.pop("batch_ms", BATCH_MS))
    dtype = torch.bfloat16 if args.pop("dtype", "bf16") == "bf16" else torch.float32
    dims = {k: int(v) for k, v in args.items()}
    fn = globals().get(kernel)
    if fn is None:
        sys.exit(f"no PyTorch reference for {kernel}")
    print(f"torch_ms={fn(dims, dtype):.4f}")


if __name__ == "__main__":
    main()
