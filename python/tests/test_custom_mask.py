"""Custom masks through the prefill wrappers (FlashInfer's custom_mask / packed_custom_mask)
against plain torch attention with the same mask."""

import pytest
import torch

import flashpage
from reference import attention
from test_wrappers import WS, close, paged_batch, request_kv


def pack(masks):
    """FlashInfer's segment packbits (little bit order), one byte-aligned segment per request."""
    out = []
    for m in masks:
        bits = m.flatten().to(torch.uint8)
        pad = (-bits.numel()) % 8
        bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
        out.append((bits * (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)).sum(1).to(torch.uint8))
    return torch.cat(out)


def random_masks(qo_lens, kv_lens, seed):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(q, k, generator=g) < 0.6 for q, k in zip(qo_lens, kv_lens)]
    masks[0][1] = False  # a row that sees nothing: o = 0
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_ragged_prefill_with_a_custom_mask(dtype, packed):
    hq, hkv, d = 4, 2, 16
    qo_lens, kv_lens = [5, 1, 9], [5, 20, 33]
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qo_lens), hq, d).to(dtype)
    k = torch.randn(sum(kv_lens), hkv, d).to(dtype)
    v = torch.randn(sum(kv_lens), hkv, d).to(dtype)
    masks = random_masks(qo_lens, kv_lens, 1)
    kw = {"packed_custom_mask": pack(masks)} if packed else {"custom_mask": torch.cat([m.flatten() for m in masks])}
    w = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS)
    # causal=True is ignored with a custom mask, as in FlashInfer.
    w.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=True, q_data_type=dtype, **kw)
    o, lse = w.run(q, k, v, return_lse=True)
    for r in range(3):
        qs = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ks = slice(int(kv_indptr[r]), int(kv_indptr[r + 1]))
        ro, _ = attention(q[qs], k[ks], v[ks], mask=masks[r])
        close(o[qs], ro, dtype, f"o[{r}]")
    assert torch.all(o[1] == 0) and torch.all(torch.isinf(lse[1]))


def test_paged_prefill_with_a_custom_mask():
    hq, hkv, d, ps, dtype = 8, 2, 64, 16, torch.float32
    kv_lens, qo_lens = [17, 40, 9], [3, 8, 9]
    indptr, indices, last, cache = paged_batch(kv_lens, ps, hkv, d, dtype, seed=5)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    masks = random_masks(qo_lens, kv_lens, 2)
    q = torch.randn(sum(qo_lens), hq, d)
    w = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS)
    w.plan(qo_indptr, indptr, indices, last, hq, hkv, d, ps, custom_mask=torch.cat([m.flatten() for m in masks]), q_data_type=dtype)
    o = w.run(q, cache)
    for r, n in enumerate(kv_lens):
        kk, vv = request_kv(cache, indptr, indices, n, r, "NHD")
        qs = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        ro, _ = attention(q[qs], kk, vv, mask=masks[r])
        close(o[qs], ro, dtype, f"o[{r}]")


def test_custom_mask_errors_name_the_argument():
    hq, hkv, d = 4, 2, 16
    qo_indptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    kv_indptr = torch.tensor([0, 4, 9], dtype=torch.int32)
    w = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS)
    with pytest.raises(flashpage.Error) as e:
        w.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=torch.ones(12, dtype=torch.bool), q_data_type=torch.float32)
    assert e.value.kind == "TensorShape" and "custom_mask" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        w.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=torch.ones(13, dtype=torch.bool),
               packed_custom_mask=torch.ones(3, dtype=torch.uint8), q_data_type=torch.float32)
    assert e.value.kind == "InvalidOption"
    with pytest.raises(flashpage.Error) as e:
        w.plan(qo_indptr, kv_indptr, hq, hkv, d, packed_custom_mask=torch.ones(1, dtype=torch.uint8), q_data_type=torch.float32)
    assert e.value.kind == "TensorShape" and "packed_custom_mask" in str(e.value)
