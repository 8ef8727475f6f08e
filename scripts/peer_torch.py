#!/usr/bin/env python3
"""PyTorch's SDPA on one `flashpage bench` case: the peer of `flashpage bench --peer torch`.

Usage: ``python3 scripts/peer_torch.py CASE_JSON`` (the bench embeds this file and runs it
with ``python -c``). CASE_JSON describes the case exactly as the bench runs it::

    {"case": "decode/llama3-8b/b8-kv4096", "decode": true, "requests": [[1, 4096], ...],
     "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "page_size": 16,
     "dtype": "bf16", "causal": false, "sm_scale": null, "soft_cap": null, "threads": 2,
     "min_calls": 10, "min_seconds": 1.0, "max_calls": 2000, "floor_calls": 3,
     "budget_seconds": 10.0}

What torch computes (and what is timed):

* Inputs: uniform random values in [-1, 1) in the case's dtype; K and V in a paged cache of
  the bench's shape (pages of ``page_size`` tokens, NHD: ``[pages, page_size, kv_heads, D]``,
  page ids shuffled), like the bench's inputs.
* Before timing, each request's pages are gathered into contiguous
  ``[batch, kv_heads, kv_len, D]`` K and V tensors (SDPA has no paged input). The gather is
  **not** in the timed region; its own median time per call is reported as ``gather_us``.
* Timed: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
  scale=sm_scale, enable_gqa=True)`` with q ``[batch, qo_heads, qo_len, D]``; one call for
  the whole batch when every request has the same lengths (the bench's matrix), else one
  call per request. ``torch.set_num_threads(threads)``.
* Logits soft-cap (Gemma-2): SDPA has no soft-cap, so the peer runs **without** it (a
  little less work than the bench's case); reported as ``soft_cap_skipped: true``.
* Timing as the bench: one warm-up call, then timed calls until at least ``min_calls``
  calls and ``min_seconds``, at most ``max_calls``, or ``floor_calls`` once
  ``budget_seconds`` are spent; the median wall time is reported (``us``), with the mean
  process CPU time per call (``cpu_us``, all threads together).

Output: one JSON line on stdout. Exit status 2 for a malformed case, 3 when torch cannot
be imported (the message names the interpreter).
"""

import json
import sys
import time


def fail(code, message):
    print(f"peer_torch: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv):
    if len(argv) != 2:
        fail(2, "expected one argument: the case as JSON")
    try:
        case = json.loads(argv[1])
    except json.JSONDecodeError as e:
        fail(2, f"the case is not JSON: {e}")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        fail(3, f"{sys.executable} cannot import torch: {e}")

    need = ["requests", "num_qo_heads", "num_kv_heads", "head_dim", "page_size", "dtype",
            "causal", "threads"]
    missing = [k for k in need if k not in case]
    if missing:
        fail(2, f"the case lacks {missing}")
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
    if case["dtype"] not in dtypes:
        fail(2, f"dtype {case['dtype']!r}: expected one of {sorted(dtypes)}")
    dtype = dtypes[case["dtype"]]
    hq, hkv, d = case["num_qo_heads"], case["num_kv_heads"], case["head_dim"]
    page = case["page_size"]
    reqs = [tuple(r) for r in case["requests"]]
    if not reqs or any(q < 1 or kv < q for q, kv in reqs) or hq % hkv or page < 1:
        fail(2, f"malformed case shape: requests {reqs}, heads {hq}/{hkv}, page {page}")
    threads = int(case["threads"])
    torch.set_num_threads(threads)
    causal = bool(case["causal"])
    scale = case.get("sm_scale")
    gen = torch.Generator().manual_seed(int(case.get("seed", 0x5eed)))

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(dtype)

    # The paged cache, pages shuffled, and each request's page list.
    pages_per = [(kv + page - 1) // page for _, kv in reqs]
    num_pages = sum(pages_per)
    k_cache = uniform(num_pages, page, hkv, d)
    v_cache = uniform(num_pages, page, hkv, d)
    perm = torch.randperm(num_pages, generator=gen)
    tables, start = [], 0
    for n in pages_per:
        tables.append(perm[start:start + n])
        start += n

    uniform_batch = len(set(reqs)) == 1
    groups = [list(range(len(reqs)))] if uniform_batch else [[i] for i in range(len(reqs))]

    def gather():
        out = []
        for grp in groups:
            kv = reqs[grp[0]][1]
            idx = torch.cat([tables[i] for i in grp])
            # [n·pages, page, hkv, d] -> [n, hkv, kv, d], contiguous.
            k = k_cache[idx].view(len(grp), -1, hkv, d)[:, :kv].transpose(1, 2).contiguous()
            v = v_cache[idx].view(len(grp), -1, hkv, d)[:, :kv].transpose(1, 2).contiguous()
            out.append((k, v))
        return out

    t = time.perf_counter()
    kvs = gather()
    gather_times = [time.perf_counter() - t]
    for _ in range(2):
        t = time.perf_counter()
        kvs = gather()
        gather_times.append(time.perf_counter() - t)
    del k_cache, v_cache
    qs = [uniform(len(grp), hq, reqs[grp[0]][0], d) for grp in groups]

    def call():
        for q, (k, v) in zip(qs, kvs):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                           enable_gqa=True)

    backend = "unknown"
    try:
        choice = torch._fused_sdp_choice(qs[0], kvs[0][0], kvs[0][1], None, 0.0, causal,
                                         scale=scale, enable_gqa=True)
        backend = torch.nn.attention.SDPBackend(choice).name
    except Exception:  # a private helper: the name is informative only
        pass

    min_calls = int(case.get("min_calls", 10))
    min_seconds = float(case.get("min_seconds", 1.0))
    max_calls = int(case.get("max_calls", 2000))
    floor_calls = int(case.get("floor_calls", 3))
    budget = float(case.get("budget_seconds", 10.0))
    call()  # warm-up
    times = []
    c0 = time.process_time()
    t_all = time.perf_counter()
    while True:
        n, el = len(times), time.perf_counter() - t_all
        if (n >= min_calls and el >= min_seconds) or n >= max_calls or (
                n >= floor_calls and el >= budget):
            break
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - c0) / len(times)

    def median(v):
        v = sorted(v)
        n = len(v)
        return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    print(json.dumps({
        "peer": "torch",
        "torch_version": torch.__version__,
        "sdpa_backend": backend,
        "threads": torch.get_num_threads(),
        "us": median(times) * 1e6,
        "cpu_us": cpu * 1e6,
        "calls": len(times),
        "gather_us": median(gather_times) * 1e6,
        "gather_timed": False,
        "soft_cap_skipped": case.get("soft_cap") is not None,
        "sdpa_calls_per_run": len(groups),
    }))


if __name__ == "__main__":
    main(sys.argv)
