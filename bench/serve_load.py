"""Load benchmark for `nsa serve` (standard library only): N concurrent clients each stream completions
back to back for a fixed number of requests; reports requests/s, output tokens/s, time to first token and
inter-token latency (median and p99) per concurrency.

    python3 bench/serve_load.py http://127.0.0.1:30000 --concurrency 1,16,64 --requests 64 --max-tokens 32
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request


def stream_one(base, prompt, max_tokens):
    body = json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}}
    ).encode()
    request = urllib.request.Request(base + "/v1/completions", body, {"content-type": "application/json"})
    start = time.perf_counter()
    stamps, tokens = [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return start, stamps, tokens


def run(base, concurrency, requests, max_tokens, report=True):
    results, lock = [], threading.Lock()
    counter = iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = stream_one(base, "<｜begin▁of▁sentence｜><｜User｜>Request %d: tell me a story" % i, max_tokens)
            with lock:
                results.append(result)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ttft = [stamps[0] - start for start, stamps, _ in results if stamps]
    itl = [b - a for _, stamps, _ in results for a, b in zip(stamps, stamps[1:])]
    tokens = sum(t for _, _, t in results)
    if not report:
        return
    p99 = lambda xs: sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(
        "concurrency %3d: %3d requests in %6.1f s, %6.2f req/s, %8.1f output tokens/s; TTFT median %7.1f ms p99 %7.1f ms; "
        "ITL median %6.1f ms p99 %6.1f ms"
        % (concurrency, len(results), wall, len(results) / wall, tokens / wall, 1e3 * med(ttft), 1e3 * p99(ttft),
           1e3 * med(itl), 1e3 * p99(itl)),
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("base", help="server address, e.g. http://127.0.0.1:30000")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured rounds of `concurrency` requests before each level (kernels compile on first use)")
    args = parser.parse_args()
    for c in [int(x) for x in args.concurrency.split(",")]:
        for _ in range(args.warmup):
            run(args.base.rstrip("/"), c, c, args.max_tokens, report=False)
        run(args.base.rstrip("/"), c, max(args.requests, c), args.max_tokens)
