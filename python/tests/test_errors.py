"""Argument errors: flashpage.Error (a ValueError) with the library's message and kind."""

import pytest
import torch

import flashpage
from test_wrappers import WS, paged_batch


def decode_setup(**kw):
    indptr, indices, last, cache = paged_batch([5, 20], 16, 2, 64, torch.float32)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(WS)
    return w, indptr, indices, last, cache


def test_error_is_a_value_error_with_kind():
    assert issubclass(flashpage.Error, ValueError)


def test_founding_case_raises_at_plan():
    """paged_kv_indptr of one entry with a qo_indptr of B + 1 entries."""
    _, _, indices, last, _ = decode_setup()
    w = flashpage.BatchPrefillWithPagedKVCacheWrapper(WS)
    qo_indptr = torch.arange(9, dtype=torch.int32)  # B = 8
    with pytest.raises(flashpage.Error) as e:
        w.plan(qo_indptr, torch.tensor([0], dtype=torch.int32), indices, last, 8, 2, 64, 16)
    assert e.value.kind == "IndptrLengthMismatch"
    assert str(e.value) == (
        "kv_indptr has 1 entry, qo_indptr has 9 entries: both must have batch_size + 1 = 9 entries"
    )


@pytest.mark.parametrize(
    "change, kind, needle",
    [
        (dict(num_qo_heads=7), "HeadRatio", "num_qo_heads (7)"),
        (dict(head_dim=60), "UnsupportedHeadDim", "head_dim 60"),
        (dict(window_left=-2), "InvalidOption", "window_left"),
        (dict(logits_soft_cap=-1.0), "InvalidOption", "logits_soft_cap"),
        (dict(pos_encoding_mode="ROPE"), "InvalidOption", "pos_encoding_mode"),
        (dict(rope_theta=5e5), "InvalidOption", "rope_theta"),
        (dict(q_data_type="int8"), "InvalidOption", "q_data_type"),
        (dict(page_size=0), "NotPositive", "page_size"),
    ],
)
def test_plan_argument_errors(change, kind, needle):
    w, indptr, indices, last, _ = decode_setup()
    args = dict(num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16, q_data_type=torch.float32)
    args.update(change)
    with pytest.raises(flashpage.Error) as e:
        w.plan(indptr, indices, last, **args)
    assert e.value.kind == kind and needle in str(e.value), str(e.value)


def test_bad_page_table():
    w, indptr, indices, last, _ = decode_setup()
    with pytest.raises(flashpage.Error) as e:
        w.plan(indptr, indices, torch.tensor([5, 17]), 8, 2, 64, 16, q_data_type=torch.float32)
    assert e.value.kind == "LastPageLen" and "kv_last_page_len[1] = 17" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        w.plan(torch.tensor([0, 2, 1]), indices, last, 8, 2, 64, 16, q_data_type=torch.float32)
    assert e.value.kind == "IndptrDecreasing"
    with pytest.raises(flashpage.Error) as e:
        w.plan(indptr, indices, torch.tensor([5, 4], dtype=torch.int64) + (1 << 40), 8, 2, 64, 16)
    assert e.value.kind == "InvalidOption" and "int32 range" in str(e.value)


def test_run_errors():
    w, indptr, indices, last, cache = decode_setup()
    q = torch.randn(2, 8, 64)
    w.plan(indptr, indices, last, 8, 2, 64, 16)  # q_data_type defaults to float16, as in FlashInfer
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache)
    assert e.value.kind == "DTypeMismatch" and "torch.float16" in str(e.value)
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type=torch.float32)
    with pytest.raises(flashpage.Error) as e:
        w.run(torch.randn(3, 8, 64), cache)
    assert e.value.kind == "TensorShape" and str(e.value).startswith("q has shape")
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache[:, :, :8])  # pages of 8 tokens, planned 16
    assert e.value.kind == "TensorShape"
    # A page id beyond the cache (the plan cannot know the cache's size).
    bad = indices.clone()
    bad[0] = cache.shape[0]
    w.plan(indptr, bad, last, 8, 2, 64, 16, q_data_type=torch.float32)
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache)
    assert e.value.kind == "PageIdOutOfRange"
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type=torch.float32)
    # out overlapping an input.
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache, out=cache.view(-1)[: q.numel()].view_as(q))
    assert e.value.kind == "InvalidOption" and "overlaps" in str(e.value)
    # A tensor that is not on the CPU.
    with pytest.raises(flashpage.Error) as e:
        w.run(q.to("meta"), cache)
    assert e.value.kind == "BackendUnavailable"
    with pytest.raises(TypeError):
        w.run([[0.0]], cache)
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache, q_scale=2.0)
    assert e.value.kind == "Unsupported"
    # Scales dequantise FP8 caches; this one is float32.
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache, k_scale=2.0)
    assert e.value.kind == "InvalidOption" and "k_scale" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        w.run(q, cache, window_left=3)
    assert e.value.kind == "InvalidOption"


def test_workspace_too_small():
    indptr, indices, last, cache = paged_batch([4000], 16, 1, 64, torch.float32)
    w = flashpage.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64, dtype=torch.uint8))
    w.plan(indptr, indices, last, 4, 1, 64, 16, q_data_type=torch.float32)
    with pytest.raises(flashpage.Error) as e:
        w.run(torch.randn(1, 4, 64), cache)
    assert e.value.kind == "WorkspaceTooSmall" and "partial_" in str(e.value)


def test_causal_query_longer_than_kv():
    w = flashpage.BatchPrefillWithRaggedKVCacheWrapper(WS)
    with pytest.raises(flashpage.Error) as e:
        w.plan(torch.tensor([0, 5]), torch.tensor([0, 3]), 4, 4, 16, causal=True)
    assert e.value.kind == "CausalQueryLongerThanKv"


def test_failed_plan_keeps_previous_plan():
    w, indptr, indices, last, cache = decode_setup()
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type=torch.float32)
    q = torch.randn(2, 8, 64)
    before = w.run(q, cache)
    with pytest.raises(flashpage.Error):
        w.plan(indptr, indices, last, 8, 3, 64, 16, q_data_type=torch.float32)
    assert torch.equal(w.run(q, cache), before)


def test_kv_dtype_different_from_q_is_unsupported_at_plan():
    w, indptr, indices, last, _ = decode_setup()
    # FP8 is a K/V dtype only (test_fp8.py runs FP8 caches).
    with pytest.raises(flashpage.Error) as e:
        w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type="float8_e4m3fn", kv_data_type="float8_e4m3fn")
    assert e.value.kind == "InvalidOption" and "q_data_type" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float16)
    assert e.value.kind == "Unsupported" and "kv_data_type" in str(e.value)


def test_append_with_a_tensor_off_the_cpu_raises_and_writes_nothing():
    """A tensor not on the CPU (a CUDA tensor in a CPU-only build; `meta` here, as this
    machine has no CUDA device) is a flashpage.Error naming the argument and its device."""
    indptr, indices, last, cache = paged_batch([3, 6], 4, 2, 16, torch.float32)
    batch = torch.tensor([0, 1], dtype=torch.int32)
    pos = torch.tensor([2, 5], dtype=torch.int32)
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    snapshot = cache.clone()
    with pytest.raises(flashpage.Error) as e:
        flashpage.append_paged_kv_cache(k.to("meta"), v, batch, pos, cache, indices, indptr, last)
    assert e.value.kind == "BackendUnavailable"
    assert "append_key" in str(e.value) and "meta" in str(e.value) and "CPU backend only" in str(e.value)
    with pytest.raises(flashpage.Error) as e:
        flashpage.append_paged_kv_cache(k, v, batch, pos, cache.to("meta"), indices, indptr, last)
    assert e.value.kind == "BackendUnavailable" and "paged_kv_cache" in str(e.value)
    assert torch.equal(cache, snapshot)
    # The same call on the CPU succeeds (the library's append).
    flashpage.append_paged_kv_cache(k, v, batch, pos, cache, indices, indptr, last)
    assert not torch.equal(cache, snapshot)
