"""FlashInfer's documented examples, with `import flashpage as flashinfer` and the device set
to the CPU: they run as written (sizes reduced where a loop over 32 layers would only cost
time)."""

import torch

import flashpage as flashinfer
from reference import attention

dev = "cpu"  # FlashInfer's examples say "cuda:0"


def test_decode_example():
    num_layers = 4
    num_qo_heads = 64
    num_kv_heads = 8
    head_dim = 128
    max_num_pages = 128
    page_size = 16
    # allocate 128MB workspace buffer
    workspace_buffer = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace_buffer, "NHD")
    batch_size = 7
    kv_page_indices = torch.arange(max_num_pages).int().to(dev)
    kv_page_indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32, device=dev)
    # 1 <= kv_last_page_len <= page_size
    kv_last_page_len = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32, device=dev)
    kv_cache_at_layer = [
        torch.randn(max_num_pages, 2, page_size, num_kv_heads, head_dim, dtype=torch.float16, device=dev)
        for _ in range(num_layers)
    ]
    # create auxiliary data structures for batch decode attention
    decode_wrapper.plan(
        kv_page_indptr,
        kv_page_indices,
        kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        pos_encoding_mode="NONE",
        data_type=torch.float16,
    )
    outputs = []
    for i in range(num_layers):
        q = torch.randn(batch_size, num_qo_heads, head_dim).half().to(dev)
        kv_cache = kv_cache_at_layer[i]
        # compute batch decode attention, reuse auxiliary data structures for all layers
        o = decode_wrapper.run(q, kv_cache)
        outputs.append(o)
    assert outputs[0].shape == (7, 64, 128)
    # spot check request 2 of the last layer
    pages = kv_cache[29:44]
    kv_len = 14 * 16 + 14
    k = pages[:, 0].reshape(-1, num_kv_heads, head_dim)[:kv_len]
    v = pages[:, 1].reshape(-1, num_kv_heads, head_dim)[:kv_len]
    ref, _ = attention(q[2:3], k, v)
    assert (o[2:3].double() - ref).abs().max() < 5e-3


def test_prefill_example():
    num_layers = 2
    num_qo_heads = 64
    num_kv_heads = 16
    head_dim = 128
    max_num_pages = 128
    page_size = 16
    workspace_buffer = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace_buffer, "NHD")
    nnz_qo = 100
    qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, nnz_qo], dtype=torch.int32, device=dev)
    paged_kv_indices = torch.arange(max_num_pages).int().to(dev)
    paged_kv_indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32, device=dev)
    # 1 <= paged_kv_last_page_len <= page_size
    paged_kv_last_page_len = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32, device=dev)
    q_at_layer = torch.randn(num_layers, nnz_qo, num_qo_heads, head_dim).half().to(dev)
    kv_cache_at_layer = torch.randn(
        num_layers, max_num_pages, 2, page_size, num_kv_heads, head_dim, dtype=torch.float16, device=dev
    )
    # create auxiliary data structures for batch prefill attention
    prefill_wrapper.plan(
        qo_indptr,
        paged_kv_indptr,
        paged_kv_indices,
        paged_kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        causal=True,
    )
    outputs = []
    for i in range(num_layers):
        q = q_at_layer[i]
        kv_cache = kv_cache_at_layer[i]
        # compute batch prefill attention, reuse auxiliary data structures
        o = prefill_wrapper.run(q, kv_cache)
        outputs.append(o)
    assert outputs[0].shape == (100, 64, 128)
    assert all(bool(o.isfinite().all()) for o in outputs)


def test_ragged_example():
    num_qo_heads = 64
    num_kv_heads = 16
    head_dim = 128
    workspace_buffer = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    prefill_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace_buffer, "NHD")
    nnz_kv = 100
    nnz_qo = 100
    qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, nnz_qo], dtype=torch.int32, device=dev)
    kv_indptr = qo_indptr.clone()
    q = torch.randn(nnz_qo, num_qo_heads, head_dim).half().to(dev)
    k = torch.randn(nnz_kv, num_kv_heads, head_dim).half().to(dev)
    v = torch.randn(nnz_kv, num_kv_heads, head_dim).half().to(dev)
    prefill_wrapper.plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, causal=True)
    o = prefill_wrapper.run(q, k, v)
    assert o.shape == torch.Size([100, 64, 128])
    ref, _ = attention(q[33:44], k[33:44], v[33:44], causal=True)
    assert (o[33:44].double() - ref).abs().max() < 5e-3


def test_merge_examples():
    seq_len = 2048
    num_heads = 32
    head_dim = 128
    va = torch.randn(seq_len, num_heads, head_dim).half().to(dev)
    sa = torch.randn(seq_len, num_heads, dtype=torch.float32).to(dev)
    vb = torch.randn(seq_len, num_heads, head_dim).half().to(dev)
    sb = torch.randn(seq_len, num_heads, dtype=torch.float32).to(dev)
    v_merged, s_merged = flashinfer.merge_state(va, sa, vb, sb)
    assert v_merged.shape == torch.Size([2048, 32, 128]) and s_merged.shape == torch.Size([2048, 32])
    flashinfer.merge_state_in_place(va, sa, vb, sb)
    assert torch.allclose(sa, s_merged)
    num_index_sets = 16
    v = torch.randn(seq_len, num_index_sets, num_heads, head_dim).half().to(dev)
    s = torch.randn(seq_len, num_index_sets, num_heads, dtype=torch.float32).to(dev)
    v, s = flashinfer.merge_states(v, s)
    assert v.shape == torch.Size([2048, 32, 128]) and s.shape == torch.Size([2048, 32])


def test_append_example():
    nnz_kv = 100
    num_kv_heads = 32
    head_dim = 128
    k_append = torch.randn(nnz_kv, num_kv_heads, head_dim).half().to(dev)
    v_append = torch.randn(nnz_kv, num_kv_heads, head_dim).half().to(dev)
    # 45 + 8 + 25 + 22 = nnz_kv
    kv_append_length = torch.tensor([45, 8, 25, 22], dtype=torch.int32, device=dev)
    kv_append_indptr = torch.cat([torch.zeros(1).int().to(dev), torch.cumsum(kv_append_length, dim=0)]).int()
    max_num_pages = 1000
    page_size = 16
    paged_kv_cache = torch.randn(max_num_pages, 2, page_size, num_kv_heads, head_dim).half().to(dev)
    num_pages_per_req = torch.tensor([3, 1, 2, 2], dtype=torch.int32, device=dev)
    kv_page_indptr = torch.cat([torch.zeros(1).int().to(dev), torch.cumsum(num_pages_per_req, dim=0)]).int()
    # use first 8 pages in the paged-kv
    kv_page_indices = torch.arange(8, dtype=torch.int32, device=dev)
    # 45 = (3 - 1) * 16 + 13
    # 8 = (1 - 1) * 16 + 8
    # 25 = (2 - 1) * 16 + 9
    # 22 = (2 - 1) * 16 + 6
    kv_last_page_len = torch.tensor([13, 8, 9, 6], dtype=torch.int32, device=dev)
    batch_indices, positions = flashinfer.get_batch_indices_positions(
        kv_append_indptr, flashinfer.get_seq_lens(kv_page_indptr, kv_last_page_len, page_size), nnz_kv
    )
    flashinfer.append_paged_kv_cache(
        k_append, v_append, batch_indices, positions, paged_kv_cache,
        kv_page_indices, kv_page_indptr, kv_last_page_len,
    )
    # request 0's 45 tokens fill pages 0, 1 and 13 slots of page 2
    assert torch.equal(paged_kv_cache[0:3, 0].reshape(-1, num_kv_heads, head_dim)[:45], k_append[:45])
    assert torch.equal(paged_kv_cache[3, 1, :8], v_append[45:53])
