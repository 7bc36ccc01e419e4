"""Sum CubeCL's per-kernel profiling log (CUBECL_DEBUG_LOG=FILE CUBECL_DEBUG_OPTION=profile: one
"| <duration> | <kernel>" line per launch, each timed with a device sync) by kernel, largest first.

    python3 bench/profile_summary.py FILE [TOP]
"""
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
line_re = re.compile(r"^\| ([0-9.]+)(ns|µs|us|ms|s)\s*\| (.+)$")


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    total, count = defaultdict(float), defaultdict(int)
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            m = line_re.match(line.strip())
            if m:
                name = re.sub(r"\s+", " ", m.group(3))[:110]
                total[name] += float(m.group(1)) * UNITS[m.group(2)]
                count[name] += 1
    whole = sum(total.values())
    print(f"{sum(count.values())} launches, {whole * 1e3:.1f} ms of kernel time")
    for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{seconds * 1e3:9.2f} ms {100 * seconds / whole:5.1f}% {count[name]:7d}x  {name}")


if __name__ == "__main__":
    main()
