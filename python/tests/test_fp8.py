"""FP8 KV caches through the wrappers (``kv_data_type`` float8_e4m3fn / float8_e5m2 with
``k_scale`` / ``v_scale``), against plain torch attention over the dequantised cache."""

import pytest
import torch

import flashpage
from reference import attention
from test_wrappers import WS, close, paged_batch, request_kv

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def quantised_cache(kv_lens, ps, hkv, d, fp8, layout="NHD", seed=0, per_head=True):
    """A paged cache of random values quantised to `fp8` with random scales (per KV head
    or per tensor), its exact dequantisation, and the scales."""
    indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, torch.float32, layout, seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = hkv if per_head else 1
    # Codes of |x| up to ~4.5 / 0.02 = 225: inside e4m3fn's range (448; torch's cast
    # turns values past it into NaN) and far from 1, so a missing scale would show.
    k_scale = torch.rand(n, generator=g) * 0.05 + 0.02
    v_scale = torch.rand(n, generator=g) * 0.05 + 0.02
    # Broadcast over one side [pages, ps, hkv, d] (NHD) or [pages, hkv, ps, d] (HND).
    bshape = (1, 1, -1, 1) if layout == "NHD" else (1, -1, 1, 1)
    codes = torch.stack(
        [(cache[:, 0] / k_scale.reshape(bshape)).to(fp8), (cache[:, 1] / v_scale.reshape(bshape)).to(fp8)], 1
    )
    deq = torch.stack([codes[:, 0].float() * k_scale.reshape(bshape), codes[:, 1].float() * v_scale.reshape(bshape)], 1)
    assert not deq.isnan().any() and deq.abs().max() > 1.0
    return indptr, indices, last, codes, deq, k_scale, v_scale


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_fp8_cache(fp8, dtype, layout, per_head):
    hq, hkv, d, ps = 8, 2, 64, 16
    kv_lens = [1, 17, 300, 5, 40]
    indptr, indices, last, codes, deq, k_scale, v_scale = quantised_cache(
        kv_lens, ps, hkv, d, fp8, layout, per_head=per_head
    )
    q = torch.randn(len(kv_lens), hq, d).to(dtype)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS, layout)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=dtype, kv_data_type=fp8)
    # Per tensor as a Python float (FlashInfer's usual form), per head as a tensor.
    ks = k_scale if per_head else float(k_scale)
    vs = v_scale if per_head else float(v_scale)
    o, lse = w.run(q, codes, k_scale=ks, v_scale=vs, return_lse=True)
    assert o.dtype == dtype
    for r, n in enumerate(kv_lens):
        k, v = request_kv(deq, indptr, indices, n, r, layout)
        ro, rl = attention(q[r : r + 1], k, v)
        close(o[r : r + 1], ro, dtype, f"o[{r}]")
        close(lse[r : r + 1], rl, torch.float32 if dtype == torch.float32 else torch.float16, f"lse[{r}]")
    # A (k_cache, v_cache) pair gives the same output.
    o2 = w.run(q, (codes[:, 0], codes[:, 1]), k_scale=ks, v_scale=vs)
    assert torch.equal(o2, o)


@pytest.mark.parametrize("fp8", FP8)
def test_prefill_fp8_cache_causal(fp8):
    hq, hkv, d, ps, dtype = 8, 2, 32, 4, torch.bfloat16
    qo_lens, kv_lens = [3, 1, 12, 9], [3, 10, 30, 9]
    indptr, indices, last, codes, deq, k_scale, v_scale = quantised_cache(kv_lens, ps, hkv, d, fp8, seed=3)
    qo = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qo[-1]), hq, d).to(dtype)
    w = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS)
    w.plan(qo, indptr, indices, last, hq, hkv, d, ps, causal=True, q_data_type=dtype, kv_data_type=fp8)
    o = w.run(q, codes, k_scale=k_scale, v_scale=v_scale)
    for r, n in enumerate(kv_lens):
        k, v = request_kv(deq, indptr, indices, n, r, "NHD")
        ro, _ = attention(q[qo[r] : qo[r + 1]], k, v, causal=True)
        close(o[qo[r] : qo[r + 1]], ro, dtype, f"o[{r}]")


def test_append_into_fp8_cache_then_decode():
    """FP8 rows are copied into a cache of their format (FlashInfer's contract); float rows
    are quantised with scale 1."""
    hq, hkv, d, ps, fp8 = 4, 2, 32, 4, torch.float8_e4m3fn
    kv_lens = [5, 9]
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    indices = torch.tensor([4, 0, 2, 1, 3], dtype=torch.int32)
    last = torch.tensor([1, 1], dtype=torch.int32)
    cache = torch.zeros(6, 2, ps, hkv, d, dtype=fp8)
    k = torch.randn(sum(kv_lens), hkv, d)
    v = torch.randn(sum(kv_lens), hkv, d)
    batch, pos = flashpage.get_batch_indices_positions(
        torch.tensor([0, 5, 14], dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32), sum(kv_lens)
    )
    # Request 0 appends FP8 rows, request 1 float32 rows.
    flashpage.append_paged_kv_cache(k[:5].to(fp8), v[:5].to(fp8), batch[:5], pos[:5], cache, indices, indptr, last)
    flashpage.append_paged_kv_cache(k[5:], v[5:], batch[5:], pos[5:], cache, indices, indptr, last)
    flat = cache[indices.long()]  # [5 pages, 2, ps, hkv, d]
    got_k = torch.cat([flat[:2, 0].reshape(-1, hkv, d)[:5], flat[2:, 0].reshape(-1, hkv, d)[:9]])
    want_k = k.to(fp8)
    assert torch.equal(got_k.view(torch.uint8), want_k.view(torch.uint8))
    q = torch.randn(2, hq, d)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.float32, kv_data_type=fp8)
    o = w.run(q, cache)
    for r, (a, b) in enumerate([(0, 5), (5, 14)]):
        ro, _ = attention(q[r : r + 1], k[a:b].to(fp8).float(), v[a:b].to(fp8).float())
        close(o[r : r + 1], ro, torch.float32, f"o[{r}]")


def test_fp8_arguments_are_checked():
    hq, hkv, d, ps = 4, 2, 32, 4
    indptr, indices, last, codes, _, k_scale, v_scale = quantised_cache([5, 9], ps, hkv, d, FP8[0])
    q = torch.randn(2, hq, d)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS)
    # FP8 queries are not a thing the wrappers take.
    with pytest.raises(flashpage.Error, match="q_data_type"):
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=FP8[0])
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.float32, kv_data_type=FP8[0])
    # Three scales for two KV heads.
    with pytest.raises(flashpage.Error, match=r"k_scale has shape \[3\]") as e:
        w.run(q, codes, k_scale=torch.ones(3))
    assert e.value.kind == "TensorShape"
    # A scale that is not positive, named with its index.
    with pytest.raises(flashpage.Error, match=r"v_scale\[1\] = 0") as e:
        w.run(q, codes, v_scale=torch.tensor([1.0, 0.0]))
    assert e.value.kind == "InvalidOption"
    # A cache of the other FP8 format than planned.
    with pytest.raises(flashpage.Error, match="float8_e4m3fn"):
        w.run(q, codes.view(torch.uint8).view(FP8[1]))
    # Scales belong to an FP8 cache: not accepted with a float cache.
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=torch.float32)
    with pytest.raises(flashpage.Error, match="k_scale") as e:
        w.run(q, codes.float(), k_scale=0.5)
    assert e.value.kind == "InvalidOption"
    with pytest.raises(flashpage.Error, match="q_scale"):
        w.run(q, codes.float(), q_scale=0.5)

