"""Every wrapper against plain torch attention on random inputs."""

import math

import pytest
import torch

import flashpage
from reference import attention

WS = torch.empty(64 << 20, dtype=torch.uint8)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def paged_batch(kv_lens, page_size, hkv, d, dtype, layout="NHD", seed=0, index_dtype=torch.int32):
    """A random paged cache holding `kv_lens` tokens per request, pages in random order."""
    g = torch.Generator().manual_seed(seed)
    counts = [(n + page_size - 1) // page_size for n in kv_lens]
    num_pages = sum(counts) + 3
    order = torch.randperm(num_pages, generator=g)[: sum(counts)]
    indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=index_dtype)
    last = torch.tensor([n - (c - 1) * page_size if c else 0 for n, c in zip(kv_lens, counts)], dtype=index_dtype)
    shape = (num_pages, 2, page_size, hkv, d) if layout == "NHD" else (num_pages, 2, hkv, page_size, d)
    cache = torch.randn(shape, generator=g).to(dtype)
    return indptr, order.to(index_dtype), last, cache


def request_kv(cache, indptr, indices, kv_len, r, layout):
    ids = indices[indptr[r] : indptr[r + 1]].long()
    pages = cache[ids]  # [p, 2, ...]
    if layout == "HND":
        pages = pages.transpose(2, 3)
    k = pages[:, 0].reshape(-1, *pages.shape[-2:])[:kv_len]
    v = pages[:, 1].reshape(-1, *pages.shape[-2:])[:kv_len]
    return k, v


def close(a, b, dtype, what):
    tol = TOL[dtype]
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item()) if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err} > {tol * scale}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("opts", [{}, {"window_left": 20}, {"logits_soft_cap": 5.0}, {"sm_scale": 0.3}])
@pytest.mark.parametrize("tuple_cache", [False, True])
def test_decode(dtype, layout, heads, opts, tuple_cache):
    hq, hkv = heads
    d, ps = 64, 16
    kv_lens = [1, 17, 40, 600, 0 + 5]
    indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, dtype, layout)
    q = torch.randn(len(kv_lens), hq, d).to(dtype)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS, layout)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=dtype, kv_data_type=dtype, **opts)
    kv = (cache[:, 0], cache[:, 1]) if tuple_cache else cache
    o, lse = w.run(q, kv, return_lse=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    for r, n in enumerate(kv_lens):
        k, v = request_kv(cache, indptr, indices, n, r, layout)
        ro, rl = attention(q[r : r + 1], k, v, window_left=opts.get("window_left", -1),
                           soft_cap=opts.get("logits_soft_cap"), sm_scale=opts.get("sm_scale"))
        close(o[r : r + 1], ro, dtype, f"o[{r}]")
        close(lse[r : r + 1], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")
    # out= is written in place and returned; without return_lse only out comes back.
    out = torch.empty_like(q)
    assert w.run(q, kv, out=out) is out
    close(out, o, dtype, "out=")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", [{}, {"window_left": 7}, {"logits_soft_cap": 30.0}, {"pos_encoding_mode": "ROPE_LLAMA"}])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_paged_prefill(dtype, causal, opts, index_dtype):
    hq, hkv, d, ps = 8, 2, 32, 4
    qo_lens, kv_lens = [3, 1, 12, 9], [3, 10, 30, 9]
    indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, dtype, seed=1, index_dtype=index_dtype)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=index_dtype)
    q = torch.randn(sum(qo_lens), hq, d).to(dtype)
    w = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS)
    w.plan(qo_indptr, indptr, indices, last, hq, hkv, d, ps, causal=causal, q_data_type=dtype, **opts)
    o, lse = w.run(q, cache, return_lse=True)
    theta = 1e4 if opts.get("pos_encoding_mode") == "ROPE_LLAMA" else None
    for r, (m, n) in enumerate(zip(qo_lens, kv_lens)):
        k, v = request_kv(cache, indptr, indices, n, r, "NHD")
        rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ro, rl = attention(q[rows], k, v, causal=causal, window_left=opts.get("window_left", -1),
                           soft_cap=opts.get("logits_soft_cap"), rope_theta=theta)
        close(o[rows], ro, dtype, f"o[{r}]")
        close(lse[rows], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_left", [-1, 5])
def test_ragged_prefill(dtype, causal, window_left):
    hq, hkv, d = 4, 2, 16
    qo_lens, kv_lens = [5, 1, 16], [5, 20, 33]
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist())
    q = torch.randn(sum(qo_lens), hq, d).to(dtype)
    k = torch.randn(sum(kv_lens), hkv, d).to(dtype)
    v = torch.randn(sum(kv_lens), hkv, d).to(dtype)
    w = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS)
    w.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=causal, window_left=window_left, q_data_type=dtype)
    o, lse = w.run(q, k, v, return_lse=True)
    for r in range(3):
        qs = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ks = slice(int(kv_indptr[r]), int(kv_indptr[r + 1]))
        ro, rl = attention(q[qs], k[ks], v[ks], causal=causal, window_left=window_left)
        close(o[qs], ro, dtype, f"o[{r}]")
        close(lse[qs], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_sinks_decode_and_prefill(dtype):
    # gpt-oss: a learned logit per head in the softmax denominator (natural log, no sm_scale).
    hq, hkv, d, ps = 8, 2, 64, 16
    kv_lens = [0, 3, 40, 600]
    indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, dtype, seed=7)
    sinks = torch.rand(hq) * 8 - 3
    q = torch.randn(len(kv_lens), hq, d).to(dtype)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=dtype)
    o, lse = w.run(q, cache, return_lse=True, sinks=sinks)
    for r, n in enumerate(kv_lens):
        k, v = request_kv(cache, indptr, indices, n, r, "NHD")
        ro, rl = attention(q[r : r + 1], k, v, sinks=sinks)
        close(o[r : r + 1], ro, dtype, f"o[{r}]")
        close(lse[r : r + 1], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")
    # The empty request: o = 0 and lse = the sink (base 2).
    assert (o[0] == 0).all()
    close(lse[0], sinks / math.log(2), torch.float32, "empty lse")
    # Without sinks the result differs (the sinks take weight).
    assert not torch.allclose(w.run(q, cache), o)
    qo_lens = [0, 3, 12, 9]
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qo_lens), hq, d).to(dtype)
    w = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS)
    w.plan(qo_indptr, indptr, indices, last, hq, hkv, d, ps, causal=True, q_data_type=dtype)
    o, lse = w.run(q, cache, return_lse=True, sinks=sinks)
    for r, (m, n) in enumerate(zip(qo_lens, kv_lens)):
        k, v = request_kv(cache, indptr, indices, n, r, "NHD")
        rows = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ro, rl = attention(q[rows], k, v, causal=True, sinks=sinks)
        close(o[rows], ro, dtype, f"o[{r}]")
        close(lse[rows], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache, sinks=sinks[:3])
    assert e.value.kind == "TensorShape" and "sinks" in str(e.value)


def test_workspace_reused_across_plans():
    """One workspace, several plans and wrappers in turn: every run matches the reference."""
    hq, hkv, d, ps = 8, 2, 64, 16
    ws = torch.empty(32 << 20, dtype=torch.uint8)
    dec = flashpage.BatchDecodeWithPagedKVCacheWrapper(ws)
    pre = flashpage.BatchPrefillWithPagedKVCacheWrapper(ws)
    for step, kv_lens in enumerate([[2000], [7, 300, 1], [2000, 2000, 5, 1024]]):
        indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, torch.float32, seed=step)
        q = torch.randn(len(kv_lens), hq, d)
        dec.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.float32)
        qo = torch.arange(len(kv_lens) + 1, dtype=torch.int32)
        pre.plan(qo, indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.float32)
        for w in (dec, pre, dec):
            o = w.run(q, cache)
            for r, n in enumerate(kv_lens):
                k, v = request_kv(cache, indptr, indices, n, r, "NHD")
                close(o[r : r + 1], attention(q[r : r + 1], k, v)[0], torch.float32, f"step {step} o[{r}]")


def test_merge_state_matches_attention_over_both_halves():
    hq, hkv, d = 4, 2, 32
    q = torch.randn(6, hq, d)
    k = torch.randn(40, hkv, d)
    v = torch.randn(40, hkv, d)
    w = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS)
    parts = []
    for ks in (slice(0, 15), slice(15, 40)):
        w.plan(torch.tensor([0, 6]), torch.tensor([0, ks.stop - ks.start]), hq, hkv, d, q_data_type=torch.float32)
        parts.append(w.run(q, k[ks].contiguous(), v[ks].contiguous(), return_lse=True))
    (va, sa), (vb, sb) = parts
    full_o, full_lse = attention(q, k, v)
    vm, sm = flashpage.merge_state(va, sa, vb, sb)
    close(vm, full_o, torch.float32, "merge_state v")
    close(sm, full_lse, torch.float32, "merge_state s")
    # merge_states over [seq, 2, heads, d]
    vs, ss = flashpage.merge_states(torch.stack([va, vb], 1), torch.stack([sa, sb], 1))
    close(vs, full_o, torch.float32, "merge_states v")
    close(ss, full_lse, torch.float32, "merge_states s")
    # merge_state_in_place with a mask: masked-out rows keep their exact values.
    mask = torch.tensor([True, False, True, True, False, True])
    v2, s2 = va.clone(), sa.clone()
    flashpage.merge_state_in_place(v2, s2, vb, sb, mask)
    close(v2[mask], full_o[mask], torch.float32, "in place v")
    close(s2[mask], full_lse[mask], torch.float32, "in place s")
    assert torch.equal(v2[~mask], va[~mask]) and torch.equal(s2[~mask], sa[~mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_states_bf16_and_empty_state(dtype):
    v = torch.randn(3, 4, 2, 16).to(dtype)
    s = torch.randn(3, 4, 2) * 3
    s[:, 3] = float("-inf")  # an empty state counts for nothing
    vo, so = flashpage.merge_states(v, s)
    w = torch.softmax(s.double() * math.log(2), 1)
    ref = (w[..., None] * v.double()).sum(1)
    close(vo, ref, dtype, "v")
    close(so, torch.logsumexp(s.double() * math.log(2), 1) / math.log(2), torch.float32, "s")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("tuple_cache", [False, True])
def test_append_paged_kv_cache(layout, tuple_cache):
    hkv, d, ps = 2, 16, 4
    # Two requests with 3 and 6 tokens before, appending 2 and 5.
    before, add = [3, 6], [2, 5]
    after = [b + a for b, a in zip(before, add)]
    indptr, indices, last, cache = paged_batch(after, ps, hkv, d, torch.float32, layout, seed=3)
    cache.zero_()
    append_indptr = torch.tensor([0, 2, 7], dtype=torch.int32)
    seq_lens = flashpage.get_seq_lens(indptr, last, ps)
    assert seq_lens.tolist() == after
    batch, pos = flashpage.get_batch_indices_positions(append_indptr, seq_lens, 7)
    assert batch.tolist() == [0, 0, 1, 1, 1, 1, 1] and pos.tolist() == [3, 4, 6, 7, 8, 9, 10]
    k, v = torch.randn(7, hkv, d), torch.randn(7, hkv, d)
    target = (cache[:, 0], cache[:, 1]) if tuple_cache else cache
    flashpage.append_paged_kv_cache(k, v, batch, pos, target, indices, indptr, last, layout)
    for r in range(2):
        kr, vr = request_kv(cache, indptr, indices, after[r], r, layout)
        rows = slice(int(append_indptr[r]), int(append_indptr[r + 1]))
        assert torch.equal(kr[before[r] :], k[rows]) and torch.equal(vr[before[r] :], v[rows])
        assert not kr[: before[r]].any()
    # A position past the request's length is an error, and nothing is written.
    snapshot = cache.clone()
    with pytest.raises(flashpage.Error) as e:
        flashpage.append_paged_kv_cache(k, v, batch, pos + 1, target, indices, indptr, last, layout)
    assert e.value.kind == "InvalidOption" and "positions" in str(e.value)
    assert torch.equal(cache, snapshot)


def test_readme_example():
    """The README's Python example runs as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    out, lse = scope["out"], scope["lse"]
    assert out.shape == (2, 8, 64) and lse.shape == (2, 8) and bool(out.isfinite().all())


def test_ragged_hnd_and_strided_q():
    """HND ragged K/V ([heads, kv_len, dim]) and a non-contiguous q give the NHD result."""
    hq, hkv, d = 4, 2, 16
    qo_indptr, kv_indptr = torch.tensor([0, 3, 7]), torch.tensor([0, 9, 20])
    q_big = torch.randn(hq, 7, d)
    q = q_big.transpose(0, 1)  # [7, hq, d], strided
    k, v = torch.randn(20, hkv, d), torch.randn(20, hkv, d)
    nhd = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS, "NHD")
    nhd.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=True, q_data_type=torch.float32)
    hnd = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS, "HND")
    hnd.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=True, q_data_type=torch.float32)
    a = nhd.run(q, k, v)
    b = hnd.run(q.contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    close(a, b, torch.float32, "HND vs NHD")
    close(a[3:7], attention(q[3:7], k[9:20], v[9:20], causal=True)[0], torch.float32, "request 1")
