"""The order of a kernel's synchronizing instructions in its SASS (`cuobjdump -sass` output): wgmma waits
(WARPGROUP.DEPBAR), products (HGMMA), mbarrier waits and arrivals (SYNCS), branches and barriers, with runs
of softmax exponentials (MUFU.EX2), conversions (F2FP) and stores (STG) collapsed to one line and a count.
Shows where ptxas put a wait relative to the work meant to run under it.

    python3 bench/sass_order.py kernel.sass
"""
import re
import sys

MARKS = ("WARPGROUP.DEPBAR", "MUFU.EX2", "HGMMA", "SYNCS.ARRIVE", "SYNCS.PHASECHK", "BRA", "BAR.", "STG", "F2FP")
COLLAPSED = ("MUFU.EX2", "HGMMA", "STG", "F2FP")


def main():
    lines = [line for line in open(sys.argv[1]) if re.match(r"\s+/\*[0-9a-f]+\*/", line)]
    rows = []
    for index, line in enumerate(lines):
        instruction = line.split("*/", 1)[1].strip().split(" ;")[0].rstrip(";")
        mark = next((m for m in reversed(MARKS) if m in instruction), None)
        if mark is None:
            continue
        if rows and rows[-1][1] == mark and mark in COLLAPSED:
            rows[-1][2] += 1
            continue
        rows.append([index, mark, 1, instruction[:80]])
    print(f"{len(lines)} instructions")
    for index, _, count, instruction in rows:
        print(f"{index:5d} x{count:<3d} {instruction}")


if __name__ == "__main__":
    main()
