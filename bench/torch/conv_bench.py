#!/usr/bin/env python3
"""PyTorch CPU reference timings for nn-core's conv benchmark.

Usage: conv_bench.py THREADS CASES_JSON [WARMUP RUNS]
CASES_JSON is a list of objects with keys name, n, cin, h, w, cout, k, stride, padding,
groups. Prints a JSON list of {"name", "fwd_ms", "fwd_bwd_ms", "kernels_ms"} (medians) on
stdout. fwd_bwd_ms is an autograd step (conv, sum, backward for input and weight);
kernels_ms runs the forward and then aten.convolution_backward (the kernel that autograd
calls for a convolution's backward) for the input and weight gradients of a fixed random
output gradient, without autograd bookkeeping.
"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    threads = int(sys.argv[1])
    cases = json.loads(sys.argv[2])
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = []
    for c in cases:
        x = torch.randn(c["n"], c["cin"], c["h"], c["w"])
        w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"]) * 0.1
        kw = dict(stride=c["stride"], padding=c["padding"], groups=c["groups"])

        def fwd():
            with torch.no_grad():
                F.conv2d(x, w, **kw)

        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)

        def fwd_bwd():
            xg.grad = None
            wg.grad = None
            F.conv2d(xg, wg, **kw).sum().backward()

        with torch.no_grad():
            gy = torch.randn_like(F.conv2d(x, w, **kw))
        s, p = [c["stride"]] * 2, [c["padding"]] * 2

        def kernels():
            with torch.no_grad():
                F.conv2d(x, w, **kw)
                torch.ops.aten.convolution_backward(
                    gy, x, w, None, s, p, [1, 1], False, [0, 0], c["groups"], [True, True, False])

        out.append({
            "name": c["name"],
            "fwd_ms": median_ms(fwd, warmup, runs),
            "fwd_bwd_ms": median_ms(fwd_bwd, warmup, runs),
            "kernels_ms": median_ms(kernels, warmup, runs),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
