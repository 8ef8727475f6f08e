"""MultiLevelCascadeAttentionWrapper: a shared prefix plus per-request pages, against the flat
batch run by the decode and prefill wrappers and against plain torch attention."""

import pytest
import torch

import flashpage
from test_wrappers import TOL, close

WS = torch.empty(64 << 20, dtype=torch.uint8)


def shared_prefix_batch(batch, prefix_pages, own_pages, page_size, hkv, d, dtype, layout, seed=0):
    """Level arrays (shared prefix, then each request's own pages) and the flat page table of
    the same batch, over one random cache whose page ids are shuffled."""
    g = torch.Generator().manual_seed(seed)
    num_pages = prefix_pages + sum(own_pages) + 2
    perm = torch.randperm(num_pages, generator=g).to(torch.int32)
    prefix = perm[:prefix_pages]
    own, at = [], prefix_pages
    for n in own_pages:
        own.append(perm[at : at + n])
        at += n
    last = torch.randint(1, page_size + 1, (batch,), generator=g, dtype=torch.int32)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    levels = (
        [i32([0, batch]), i32([0, prefix_pages]), prefix, i32([page_size])],
        [
            i32(list(range(batch + 1))),
            i32([0] + torch.tensor(own_pages).cumsum(0).tolist()),
            torch.cat(own),
            last,
        ],
    )
    flat_indices = torch.cat([torch.cat([prefix, o]) for o in own])
    flat_indptr = i32([0] + torch.tensor([prefix_pages + n for n in own_pages]).cumsum(0).tolist())
    shape = (num_pages, 2, page_size, hkv, d) if layout == "NHD" else (num_pages, 2, hkv, page_size, d)
    cache = torch.randn(shape, generator=g).to(dtype)
    return levels, (flat_indptr, flat_indices, last), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("opts", [{}, {"logits_soft_cap": 5.0}, {"sm_scale": 0.3}])
def test_cascade_decode_equals_the_flat_batch(dtype, layout, opts):
    hq, hkv, d, ps = 8, 2, 64, 16
    batch, own = 5, [1, 3, 2, 1, 4]
    levels, flat, cache = shared_prefix_batch(batch, 6, own, ps, hkv, d, dtype, layout)
    q = torch.randn(batch, hq, d).to(dtype)
    w = flashpage.MultiLevelCascadeAttentionWrapper(2, WS, layout)
    w.plan(*[list(x) for x in zip(*levels)], hq, hkv, d, ps, q_data_type=dtype, **opts)
    o = w.run(q, cache)
    assert o.shape == q.shape and o.dtype == dtype
    dec = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS, layout)
    dec.plan(*flat, hq, hkv, d, ps, q_data_type=dtype, **opts)
    close(o, dec.run(q, cache), dtype, f"cascade vs flat decode {opts}")


def test_cascade_prefill_is_causal_on_the_last_level_only():
    hq, hkv, d, ps, dtype = 4, 2, 64, 16, torch.float32
    batch, own = 3, [2, 3, 2]
    levels, flat, cache = shared_prefix_batch(batch, 4, own, ps, hkv, d, dtype, "NHD", seed=3)
    # Three query rows per request: its last three keys (all in its own pages).
    qo = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    levels[0][0] = torch.tensor([0, 9], dtype=torch.int32)
    levels[1][0] = qo
    q = torch.randn(9, hq, d)
    w = flashpage.MultiLevelCascadeAttentionWrapper(2, WS, "NHD")
    w.plan(*[list(x) for x in zip(*levels)], hq, hkv, d, ps, causal=True, q_data_type=dtype)
    pre = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS, "NHD")
    pre.plan(qo, *flat, hq, hkv, d, ps, causal=True, q_data_type=dtype)
    close(w.run(q, (cache[:, 0], cache[:, 1])), pre.run(q, cache), dtype, "causal cascade vs flat prefill")


def test_cascade_errors_name_the_argument():
    hq, hkv, d, ps, dtype = 4, 2, 64, 16, torch.float32
    levels, _, cache = shared_prefix_batch(2, 2, [1, 1], ps, hkv, d, dtype, "NHD")
    arrs = [list(x) for x in zip(*levels)]
    w = flashpage.MultiLevelCascadeAttentionWrapper(2, WS)
    with pytest.raises(flashpage.Error) as e:
        w.plan(arrs[0][:1], *arrs[1:], hq, hkv, d, ps, q_data_type=dtype)
    assert e.value.kind == "ArrayLength"
    with pytest.raises(flashpage.Error) as e:
        w.plan(*arrs, hq, hkv, d, ps, q_data_type=dtype, window_left=8)
    assert e.value.kind == "InvalidOption" and "window_left" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        w.plan(*arrs, hq, hkv, d, ps, q_data_type=dtype, pos_encoding_mode="ROPE_LLAMA")
    assert e.value.kind == "InvalidOption" and "pos_encoding" in str(e.value)
    # A level over other rows than level 0.
    bad = [list(a) for a in arrs]
    bad[0][1] = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(flashpage.Error) as e:
        w.plan(*bad, hq, hkv, d, ps, q_data_type=dtype)
    assert e.value.kind == "QueryRows"
    # A page id past the cache is found at run time, when the cache is known.
    far = [list(a) for a in arrs]
    far[2][0] = torch.tensor([10_000, 0], dtype=torch.int32)
    w.plan(*far, hq, hkv, d, ps, q_data_type=dtype)
    with pytest.raises(flashpage.Error) as e:
        w.run(torch.randn(2, hq, d), cache)
    assert e.value.kind == "PageIdOutOfRange"
    with pytest.raises(flashpage.Error):
        flashpage.MultiLevelCascadeAttentionWrapper(0, WS)
