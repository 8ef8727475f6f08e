"""Overhead of a Python `run` call beyond the kernel, on a decode batch of 32.

Measures, for the same plan and tensors: (a) `wrapper.run(q, cache, out=out)` from Python,
(b) the extension's `run_paged` called directly (no Python wrapper layer), and (c) the kernel
alone, timed inside the extension (`_flashpage.AttentionPlan.time_kernel`: the same checks
and backend call as a run, timed in Rust, minus argument extraction from Python), and (d) the
extension's argument handling alone (`time_kernel(..., 0)`: read and check, no kernel).

    python python/bench/overhead.py
"""

import time

import torch

import flashpage
from flashpage import _flashpage


def best_of(f, n, reps=7):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main():
    # A small cache, so the kernel is short and the overhead measurable on a noisy machine,
    # then a realistic one for scale.
    for hq, hkv, d, kv_len, n in ((8, 2, 64, 16, 2000), (32, 8, 128, 512, 50)):
        measure(hq, hkv, d, kv_len, n)


def measure(hq, hkv, d, kv_len, n):
    B, ps = 32, 16
    pages_per = kv_len // ps
    num_pages = B * pages_per
    indices = torch.randperm(num_pages).to(torch.int32)
    indptr = torch.arange(B + 1, dtype=torch.int32) * pages_per
    last = torch.full((B,), ps, dtype=torch.int32)
    cache = torch.randn(num_pages, 2, ps, hkv, d, dtype=torch.bfloat16)
    q = torch.randn(B, hq, d, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    ws = torch.empty(128 << 20, dtype=torch.uint8)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(ws)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16)
    plan = w._plan
    w.run(q, cache, out=out)
    # Interleaved, best of many rounds: the machine may be shared.
    t_wrapper = t_ext = t_kernel = t_dry = float("inf")
    for _ in range(15):
        t_dry = min(t_dry, best_of(lambda: plan.time_kernel(ws, q, cache, out, 0), n, 1))
        t_wrapper = min(t_wrapper, best_of(lambda: w.run(q, cache, out=out), n, 1))
        t_ext = min(t_ext, best_of(lambda: plan.run_paged(ws, q, cache, out), n, 1))
        t_kernel = min(t_kernel, plan.time_kernel(ws, q, cache, out, n))
    # The wrapper's own Python code, exactly: wrapper.run over a plan whose run_paged does
    # nothing, minus calling that no-op directly.
    class Noop:
        window_left = -1

        def run_paged(self, *a):
            pass

    noop = Noop()
    real, w._plan = w._plan, noop
    t_layer = best_of(lambda: w.run(q, cache, out=out), 20000) - best_of(lambda: noop.run_paged(ws, q, cache, out, None), 20000)
    w._plan = real
    t_plan = best_of(lambda: w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.bfloat16), 50)
    print(f"threads {flashpage.num_threads()}, decode B={B} hq={hq} hkv={hkv} d={d} kv_len={kv_len} bf16")
    print(f"kernel (timed in Rust)      {t_kernel * 1e6:8.1f} us")
    print(f"extension run_paged         {t_ext * 1e6:8.1f} us  (+{(t_ext - t_kernel) * 1e6:.1f} us)")
    print(f"wrapper.run                 {t_wrapper * 1e6:8.1f} us  (+{(t_wrapper - t_kernel) * 1e6:.1f} us)")
    print(f"extension, arguments only   {t_dry * 1e6:8.1f} us  (read and check from Python, no kernel)")
    print(f"wrapper layer (Python)      {(t_wrapper - t_ext) * 1e6:8.1f} us  (wrapper.run - run_paged)")
    print(f"wrapper layer, exactly      {t_layer * 1e6:8.1f} us  (wrapper.run over a no-op plan)")
    print(f"overhead beyond the kernel  {(t_dry + t_layer) * 1e6:8.1f} us  (arguments only + wrapper layer)")
    print(f"wrapper.plan                {t_plan * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
