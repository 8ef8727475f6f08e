"""flashpage: paged-KV attention for LLM serving, behind FlashInfer's Python API.

A program written for FlashInfer runs by changing its import::

    import flashpage as flashinfer

The wrappers (:class:`BatchDecodeWithPagedKVCacheWrapper`,
:class:`BatchPrefillWithPagedKVCacheWrapper`, :class:`BatchPrefillWithRaggedKVCacheWrapper`,
:class:`MultiLevelCascadeAttentionWrapper`),
the state merges (:func:`merge_state`, :func:`merge_state_in_place`, :func:`merge_states`) and
the page helpers (:func:`append_paged_kv_cache`, :func:`get_seq_lens`,
:func:`get_batch_indices_positions`) take the same arguments with the same defaults and
meanings as FlashInfer's. Returned LSEs are base 2, ``window_left=-1`` means no window.

flashpage validates every batch before it plans it: a malformed batch raises
:class:`Error` (a ``ValueError``) whose message names the argument, the expected and the actual
value, and whose ``kind`` names the error (e.g. ``"IndptrLengthMismatch"``).

This build runs on the CPU backend: tensors are torch CPU tensors (float32, float16, bfloat16;
int32 or int64 indices), read in place without copies. See docs/python.md.
"""

from ._flashpage import Error, __version__, num_threads
from ._wrappers import (
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper,
    append_paged_kv_cache,
    get_batch_indices_positions,
    get_seq_lens,
    merge_state,
    merge_state_in_place,
    merge_states,
)

__all__ = [
    "Error",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "MultiLevelCascadeAttentionWrapper",
    "append_paged_kv_cache",
    "get_batch_indices_positions",
    "get_seq_lens",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
    "num_threads",
    "__version__",
]
