"""Summarize Nsight Compute's per-instruction source counters of one kernel launch: where its warps spend
their time, by code region. Regions are runs of SASS instructions with the same execution class (the
block loop runs most often; per-tile code about once a tile), so the summary separates loop work from
per-tile prologue and epilogue without source line information.

    ncu --section SourceCounters -o r ... && ncu -i r.ncu-rep --page source --csv --print-source sass > r.csv
    python3 bench/sass_summary.py r.csv [TOP]

Prints the instruction count and warp-stall samples, each region with at least 1% of the samples (its
share and main stall reasons), then the TOP instructions with the most samples (default 15).
"""
import csv
import sys
from collections import Counter


def load(path):
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    header_at = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    header = rows[header_at]
    return header, [r for r in rows[header_at + 1 :] if len(r) == len(header)]


def number(text):
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def main():
    header, rows = load(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    source = header.index("Source")
    samples = header.index("Warp Stall Sampling (All Samples)")
    executed = header.index("Instructions Executed")
    reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    counts = [number(r[executed]) for r in rows]
    weights = [number(r[samples]) for r in rows]
    total = sum(weights) or 1.0
    # The block loop's count: the one carrying the most executed instructions (not the largest count, which
    # a barrier's spin loop can reach).
    by_count = Counter()
    for count in counts:
        by_count[count] += count
    most = max(by_count, key=by_count.get) or 1.0
    print(f"{len(rows)} SASS instructions, {sum(counts):.0f} executed (warp level), {total:.0f} samples")

    def kind(count):
        if count >= 0.5 * most:
            return "loop"
        if count >= 0.05 * most:
            return "per-tile"
        return "rare" if count > 0 else "not run"

    regions = []
    for i, count in enumerate(counts):
        k = kind(count)
        if regions and regions[-1][0] == k:
            regions[-1][2] = i
        else:
            regions.append([k, i, i])
    shares = Counter()
    for k, first, last in regions:
        weight = sum(weights[first : last + 1])
        shares[k] += weight
        if weight < 0.01 * total:
            continue
        stalls = Counter()
        for r in rows[first : last + 1]:
            for i in reasons:
                stalls[header[i][len("stall_") :]] += number(r[i])
        main_stalls = ", ".join(f"{name} {100 * v / total:.1f}%" for name, v in stalls.most_common(3))
        print(f"  {k:8s} instr {first:5d}-{last:5d}: {100 * weight / total:5.1f}%  ({main_stalls})")
    print("  by class: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in shares.most_common()))
    print(f"top {top} instructions by samples:")
    for i in sorted(sorted(range(len(rows)), key=lambda i: -weights[i])[:top]):
        print(f"  {i:5d} {100 * weights[i] / total:5.1f}% x{counts[i]:<8.0f} {rows[i][source].strip()[:80]}")


if __name__ == "__main__":
    main()
