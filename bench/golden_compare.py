#!/usr/bin/env python3
"""Check `nsa forward` outputs against the golden file without numpy (for machines without Rust, e.g. the H200).

  golden_compare.py ids DIR           writes DIR/ids{8,40,100}.safetensors (`input_ids` I32 of the golden sequences)
  golden_compare.py check PATTERN     compares PATTERN % n (n = 8, 40, 100; outputs of `nsa forward`) with the
                                      golden logits, residual streams, indexer top-k sets and router experts;
                                      exit 1 past the bound (logits max |d| 1e-3, every selection equal)
"""
import json
import os
import struct
import sys

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tiny-v32", "golden.safetensors")
FORMATS = {"F32": "f", "I32": "i", "I64": "q"}


def load(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header, base, tensors = json.loads(data[8 : 8 + n]), 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw, fmt = data[base + start : base + end], FORMATS[meta["dtype"]]
        tensors[name] = (meta["shape"], struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw))
    return tensors


def save_ids(path, ids):
    raw = struct.pack("<%di" % len(ids), *ids)
    header = json.dumps({"input_ids": {"dtype": "I32", "shape": [len(ids)], "data_offsets": [0, len(raw)]}}).encode()
    header += b" " * (-len(header) % 8)
    open(path, "wb").write(struct.pack("<Q", len(header)) + header + raw)


def rows_differing(ours, theirs, n, causal):
    k_ours, k_theirs, bad = len(ours) // n, len(theirs) // n, 0
    for s in range(n):
        keep = (lambda t: 0 <= t <= s) if causal else (lambda t: True)
        a = {t for t in ours[s * k_ours : (s + 1) * k_ours] if keep(t)}
        b = {t for t in theirs[s * k_theirs : (s + 1) * k_theirs] if keep(t)}
        bad += a != b
    return bad


def check(pattern):
    golden, ok = load(GOLDEN), True
    for n in (8, 40, 100):
        if not os.path.exists(pattern % n):
            print("seq%d: %s missing: FAILED" % (n, pattern % n))
            ok = False
            continue
        ours = load(pattern % n)
        logits = max(abs(a - b) for a, b in zip(ours["logits"][1], golden["seq%d.logits" % n][1]))
        layers = max(abs(a - b) for a, b in zip(ours["layer_out"][1], golden["seq%d.layer_out" % n][1]))
        index = sum(
            rows_differing(ours["layer%d.index_topk" % l][1], golden["seq%d.layer%d.index_topk" % (n, l)][1], n, True)
            for l in range(3)
        )
        router = sum(
            rows_differing(ours["layer%d.router_topk_ids" % l][1], golden["seq%d.layer%d.router_topk_ids" % (n, l)][1], n, False)
            for l in (1, 2)
        )
        passed = logits <= 1e-3 and layers <= 1e-3 and index == 0 and router == 0
        ok &= passed
        print(
            "seq%d: logits max |d| %.2e, layer_out max |d| %.2e, indexer rows differing %d, router rows differing %d: %s"
            % (n, logits, layers, index, router, "ok" if passed else "FAILED")
        )
    return ok


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ids":
        golden = load(GOLDEN)
        for n in (8, 40, 100):
            save_ids(os.path.join(sys.argv[2], "ids%d.safetensors" % n), golden["seq%d.input_ids" % n][1])
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        sys.exit(0 if check(sys.argv[2]) else 1)
    else:
        sys.exit(__doc__)
