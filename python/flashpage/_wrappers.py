"""FlashInfer's wrapper API over flashpage's planner and CPU backend.

Names, argument names, defaults and meanings follow FlashInfer (``flashinfer.decode``,
``flashinfer.prefill``, ``flashinfer.cascade``, ``flashinfer.page``). Where FlashInfer has
GPU-only knobs (``use_tensor_cores``, ``enable_pdl``, ``non_blocking``, ``backend``) they are
accepted and have no effect; features flashpage does not implement here (FP8 scales,
different q/k and v head dims) raise :class:`flashpage.Error` of kind
``Unsupported`` instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch

from . import _flashpage
from ._flashpage import Error

__all__ = [
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
]


def _error(kind: str, message: str) -> Error:
    e = Error(message)
    e.kind = kind
    return e


def _unsupported(what: str) -> Error:
    return _error("Unsupported", f"backend cpu does not support {what}")


def _dtype_name(dt: Union[str, torch.dtype, None]) -> Optional[str]:
    if dt is None:
        return None
    return str(dt)


def _check_layout(kv_layout: str) -> str:
    if kv_layout not in ("NHD", "HND"):
        raise _error(
            "InvalidOption",
            f'kv_layout = {kv_layout!r} is invalid: expected "NHD" or "HND"',
        )
    return kv_layout


def _reject(name: str, value: Any) -> None:
    """Raises for a FlashInfer argument flashpage does not implement, unless at its default."""
    if value is not None and value is not False and not (isinstance(value, int) and value == 0):
        raise _unsupported(f"{name} (got {type(value).__name__})")


def _check_extra(kwargs: dict) -> None:
    for k, v in kwargs.items():
        _reject(k, v)


def _check_run_extras(args: tuple, q_scale) -> None:
    if args:
        raise _unsupported("extra positional arguments to run (JIT module arguments)")
    if q_scale is not None:
        raise _unsupported("q_scale (q is float32, float16 or bfloat16)")


class _Wrapper:
    """State shared by the three wrappers: the workspace and the current plan."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool):
        self._float_workspace_buffer = float_workspace_buffer
        self._kv_layout = _check_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        self._plan: Optional[_flashpage.AttentionPlan] = None
        self._num_qo_heads = 0
        self._head_dim = 0
        self._q_dtype: Optional[torch.dtype] = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was created for CUDA-graph capture (no effect on the CPU)."""
        return self._use_cuda_graph

    def reset_workspace_buffer(
        self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: Optional[torch.Tensor] = None, *args
    ) -> None:
        """Replaces the workspace (FlashInfer's signature; the int workspace is not needed)."""
        self._float_workspace_buffer = float_workspace_buffer

    def _plan_common(
        self,
        qo_indptr,
        kv_indptr,
        kv_indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        causal,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        q_data_type,
        kv_data_type,
        custom_mask=None,
        packed_custom_mask=None,
    ) -> None:
        masks = {}
        if custom_mask is not None or packed_custom_mask is not None:
            # FlashInfer: the causal mask applies only when no custom mask is given.
            causal = False
            masks = {"custom_mask": custom_mask, "packed_custom_mask": packed_custom_mask}
        # Plan first: a failed plan leaves the previous one in place.
        self._set_plan(
            _flashpage.plan,
            (qo_indptr, kv_indptr, kv_indices, last_page_len),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            causal,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
            **masks,
        )

    def _set_plan(
        self,
        planner,
        arrays: tuple,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        causal,
        pos_encoding_mode,
        window_left,
        logits_soft_cap,
        sm_scale,
        rope_scale,
        rope_theta,
        q_data_type,
        kv_data_type,
        **masks,
    ) -> None:
        """Calls ``planner`` (``_flashpage.plan`` or ``plan_cascade``) with the index
        ``arrays``, the options converted as the extension takes them and the custom mask
        (``masks``, ``_flashpage.plan`` only); keeps the plan only when planning succeeds."""
        q_name = _dtype_name(q_data_type)
        kv_name = _dtype_name(kv_data_type) or q_name
        plan = planner(
            *arrays,
            int(num_qo_heads),
            int(num_kv_heads),
            int(head_dim),
            None if page_size is None else int(page_size),
            self._kv_layout,
            bool(causal),
            int(window_left),
            None if logits_soft_cap is None else float(logits_soft_cap),
            None if sm_scale is None else float(sm_scale),
            str(pos_encoding_mode),
            None if rope_scale is None else float(rope_scale),
            None if rope_theta is None else float(rope_theta),
            q_name,
            kv_name,
            **masks,
        )
        self._plan = plan
        self._num_qo_heads = int(num_qo_heads)
        self._head_dim = int(head_dim)

    def _outputs(self, q: torch.Tensor, out, lse, return_lse: bool):
        if self._plan is None:
            raise RuntimeError("plan() must be called before run()")
        if isinstance(q, torch.Tensor) and not q.is_contiguous():
            q = q.contiguous()  # FlashInfer takes strided q; flashpage reads it packed
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if return_lse:
            if lse is None:
                lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32)
        else:
            lse = None
        return q, out, lse

    def _check_window(self, window_left) -> None:
        if window_left is not None and int(window_left) != self._plan.window_left:
            raise _error(
                "InvalidOption",
                f"window_left = {window_left} is invalid: expected the planned window "
                f"{self._plan.window_left} (flashpage plans the window; replan to change it)",
            )


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    """Batch decode (one query row per request) over a paged KV cache.

    Same API as ``flashinfer.BatchDecodeWithPagedKVCacheWrapper``: build once with a workspace
    (a ``torch.uint8`` CPU tensor; FlashInfer recommends 128 MB), ``plan`` once per step,
    ``run`` once per layer.
    """

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
        paged_kv_indices_buffer: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[list] = None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph)
        self._use_tensor_cores = use_tensor_cores
        _reject("jit_args", jit_args)

    @property
    def use_tensor_cores(self) -> bool:
        """FlashInfer's kernel choice flag (no effect on the CPU)."""
        return self._use_tensor_cores

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        pos_encoding_mode: str = "NONE",
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        q_data_type: Optional[Union[str, torch.dtype]] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        data_type: Optional[Union[str, torch.dtype]] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        non_blocking: bool = True,
        **kwargs: Any,
    ) -> None:
        """Validates and plans a decode batch (page table in CSR form: ``indptr`` [B + 1],
        ``indices`` page ids, ``last_page_len`` [B]). Raises :class:`flashpage.Error`."""
        _check_extra(kwargs)
        if data_type is not None:  # FlashInfer's deprecated single dtype
            q_data_type = data_type
            if kv_data_type is None:
                kv_data_type = data_type
        self._plan_common(
            None,
            indptr,
            indices,
            last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            False,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        *args: Any,
        q_scale: Optional[float] = None,
        k_scale: Optional[Union[float, torch.Tensor]] = None,
        v_scale: Optional[Union[float, torch.Tensor]] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        window_left: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``q`` [batch_size, num_qo_heads, head_dim] over the paged cache
        (one tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD) /
        ``[num_pages, 2, num_kv_heads, page_size, head_dim]`` (HND), or a ``(k_cache, v_cache)``
        pair). Returns ``out``, or ``(out, lse)`` with ``lse`` base 2 when ``return_lse``.
        ``sinks`` (float32 [num_qo_heads], natural log) are attention sinks (gpt-oss): one
        extra logit per head in the softmax denominator, with no value. An FP8 cache
        (``kv_data_type`` ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` at plan) is
        dequantised by ``k_scale`` / ``v_scale``: a float or a float32 tensor of
        ``[num_kv_heads]`` (per KV head), default 1."""
        if args or q_scale is not None:
            _check_run_extras(args, q_scale)
        if window_left is not None:
            self._check_window(window_left)
        q, out, lse = self._outputs(q, out, lse, return_lse)
        self._plan.run_paged(
            self._float_workspace_buffer, q, paged_kv_cache, out, lse, sinks, k_scale, v_scale
        )
        return (out, lse) if return_lse else out

    forward = run


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    """Batch prefill (ragged query rows per request: prefill, chunked prefill, speculative
    verification) over a paged KV cache. Same API as
    ``flashinfer.BatchPrefillWithPagedKVCacheWrapper``."""

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indptr_buf: Optional[torch.Tensor] = None,
        paged_kv_indices_buf: Optional[torch.Tensor] = None,
        paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[list] = None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph)
        _reject("custom_mask_buf", custom_mask_buf)
        _reject("jit_args", jit_args)

    def plan(
        self,
        qo_indptr: torch.Tensor,
        paged_kv_indptr: torch.Tensor,
        paged_kv_indices: torch.Tensor,
        paged_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        page_size: int,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        **kwargs: Any,
    ) -> None:
        """Validates and plans a prefill batch: request ``r`` owns query rows
        ``qo_indptr[r]:qo_indptr[r+1]`` and the pages of the CSR page table. The causal mask is
        bottom-right aligned, as in FlashInfer. Raises :class:`flashpage.Error`."""
        _check_extra(kwargs)
        if head_dim_vo is not None and int(head_dim_vo) != int(head_dim_qk):
            raise _unsupported(f"head_dim_vo {head_dim_vo} different from head_dim_qk {head_dim_qk}")
        self._plan_common(
            qo_indptr,
            paged_kv_indptr,
            paged_kv_indices,
            paged_kv_last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            page_size,
            causal,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
            custom_mask=custom_mask,
            packed_custom_mask=packed_custom_mask,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        *args: Any,
        q_scale: Optional[float] = None,
        k_scale: Optional[Union[float, torch.Tensor]] = None,
        v_scale: Optional[Union[float, torch.Tensor]] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
        window_left: Optional[int] = None,
        sinks: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``q`` [qo_indptr[-1], num_qo_heads, head_dim] over the paged cache.
        Returns ``out``, or ``(out, lse)`` with ``lse`` base 2 when ``return_lse``. ``sinks``
        (float32 [num_qo_heads], natural log) are attention sinks; ``k_scale`` / ``v_scale``
        dequantise an FP8 cache (as in ``BatchDecodeWithPagedKVCacheWrapper.run``)."""
        if args or q_scale is not None:
            _check_run_extras(args, q_scale)
        if window_left is not None:
            self._check_window(window_left)
        q, out, lse = self._outputs(q, out, lse, return_lse)
        self._plan.run_paged(
            self._float_workspace_buffer, q, paged_kv_cache, out, lse, sinks, k_scale, v_scale
        )
        return (out, lse) if return_lse else out

    forward = run


class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
    """Batch prefill over contiguous (ragged) K/V: request ``r`` owns query rows
    ``qo_indptr[r]:qo_indptr[r+1]`` and keys ``kv_indptr[r]:kv_indptr[r+1]``. Same API as
    ``flashinfer.BatchPrefillWithRaggedKVCacheWrapper``."""

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf: Optional[torch.Tensor] = None,
        kv_indptr_buf: Optional[torch.Tensor] = None,
        custom_mask_buf: Optional[torch.Tensor] = None,
        mask_indptr_buf: Optional[torch.Tensor] = None,
        backend: str = "auto",
        jit_args: Optional[list] = None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph)
        _reject("custom_mask_buf", custom_mask_buf)
        _reject("jit_args", jit_args)

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        head_dim_vo: Optional[int] = None,
        custom_mask: Optional[torch.Tensor] = None,
        packed_custom_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        sm_scale: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
        non_blocking: bool = True,
        **kwargs: Any,
    ) -> None:
        """Validates and plans a ragged prefill batch. Raises :class:`flashpage.Error`."""
        _check_extra(kwargs)
        if head_dim_vo is not None and int(head_dim_vo) != int(head_dim_qk):
            raise _unsupported(f"head_dim_vo {head_dim_vo} different from head_dim_qk {head_dim_qk}")
        self._plan_common(
            qo_indptr,
            kv_indptr,
            None,
            None,
            num_qo_heads,
            num_kv_heads,
            head_dim_qk,
            None,
            causal,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
            custom_mask=custom_mask,
            packed_custom_mask=packed_custom_mask,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *args: Any,
        q_scale: Optional[float] = None,
        k_scale: Optional[Union[float, torch.Tensor]] = None,
        v_scale: Optional[Union[float, torch.Tensor]] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        enable_pdl: Optional[bool] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``q`` [qo_indptr[-1], num_qo_heads, head_dim] over ``k``, ``v``
        [kv_indptr[-1], num_kv_heads, head_dim] (NHD; HND: [num_kv_heads, kv_indptr[-1],
        head_dim]). Returns ``out``, or ``(out, lse)`` with
        ``lse`` base 2 when ``return_lse``; ``k_scale`` / ``v_scale`` dequantise FP8 ``k``
        / ``v``."""
        if args or q_scale is not None:
            _check_run_extras(args, q_scale)
        q, out, lse = self._outputs(q, out, lse, return_lse)
        self._plan.run_ragged(self._float_workspace_buffer, q, k, v, out, lse, k_scale, v_scale)
        return (out, lse) if return_lse else out

    forward = run


class MultiLevelCascadeAttentionWrapper(_Wrapper):
    """Cascade (shared-prefix) attention: ``num_levels`` paged prefill levels over the same
    query rows, merged by LSE into attention over every level's keys. Same API as
    ``flashinfer.MultiLevelCascadeAttentionWrapper``; see docs/cascade.md.

    Level ``l``'s ``qo_indptr`` groups the query rows: every row of group ``i`` attends to
    that group's pages at level ``l`` (a shared prefix is read once for all its rows).
    ``causal`` applies to the last level only. A sliding window or a position encoding
    (``ROPE_LLAMA``, ``ALIBI``) would need each key's position in its request and raises
    :class:`flashpage.Error` of kind ``InvalidOption``."""

    def __init__(
        self,
        num_levels: int,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        qo_indptr_buf_arr: Optional[list] = None,
        paged_kv_indptr_buf_arr: Optional[list] = None,
        paged_kv_indices_buf_arr: Optional[list] = None,
        paged_kv_last_page_len_buf_arr: Optional[list] = None,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph)
        n = int(num_levels)
        if not 1 <= n <= 16:
            raise _error("InvalidOption", f"num_levels = {num_levels} is invalid: expected 1..=16 cascade levels")
        self._num_levels = n

    def plan(
        self,
        qo_indptr_arr: list,
        paged_kv_indptr_arr: list,
        paged_kv_indices_arr: list,
        paged_kv_last_page_len: list,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        sm_scale: Optional[float] = None,
        window_left: int = -1,
        logits_soft_cap: Optional[float] = None,
        rope_scale: Optional[float] = None,
        rope_theta: Optional[float] = None,
        q_data_type: Union[str, torch.dtype] = "float16",
        kv_data_type: Optional[Union[str, torch.dtype]] = None,
    ) -> None:
        """Validates and plans every level. Each of the four lists has one tensor per level;
        every ``qo_indptr`` ends at the same number of query rows. Raises
        :class:`flashpage.Error`; a failed plan leaves the previous one in place."""
        if len(qo_indptr_arr) != self._num_levels:
            raise _error(
                "ArrayLength",
                f"qo_indptr_arr has {len(qo_indptr_arr)} entries, expected {self._num_levels} "
                f"(num_levels of the wrapper)",
            )
        self._set_plan(
            _flashpage.plan_cascade,
            (
                list(qo_indptr_arr),
                list(paged_kv_indptr_arr),
                list(paged_kv_indices_arr),
                list(paged_kv_last_page_len),
            ),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            int(page_size),
            causal,
            pos_encoding_mode,
            window_left,
            logits_soft_cap,
            sm_scale,
            rope_scale,
            rope_theta,
            q_data_type,
            kv_data_type,
        )

    begin_forward = plan

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Attention of ``q`` [rows, num_qo_heads, head_dim] over every level's keys of the
        paged cache (one tensor or a ``(k_cache, v_cache)`` pair). Returns ``out``."""
        q, out, _ = self._outputs(q, None, None, False)
        self._plan.run_paged(self._float_workspace_buffer, q, paged_kv_cache, out, None, None)
        return out

    forward = run


def merge_state(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges two attention states: ``v_*`` [seq_len, num_heads, head_dim], ``s_*``
    [seq_len, num_heads] float32 base-2 LSEs. Returns the merged ``(V, S)``."""
    v_out = torch.empty_like(v_a, memory_format=torch.contiguous_format)
    s_out = torch.empty_like(s_a, dtype=torch.float32, memory_format=torch.contiguous_format)
    _flashpage.merge_state(_c(v_a), s_a, _c(v_b), s_b, v_out, s_out)
    return v_out, s_out


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> None:
    """Merges ``(v_other, s_other)`` into ``(v, s)`` in place (base-2 LSEs); rows whose
    ``mask`` entry is false are left unchanged. ``v`` and ``s`` must be contiguous."""
    _flashpage.merge_state_in_place(v, s, _c(v_other), s_other, mask)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges ``num_states`` states per row: ``v`` [seq_len, num_states, num_heads, head_dim],
    ``s`` [seq_len, num_states, num_heads] (base 2). Returns ``(V, S)``: [seq_len, num_heads,
    head_dim] and [seq_len, num_heads]."""
    if v.dim() != 4:
        raise _error(
            "TensorShape",
            f"v has shape {list(v.shape)}, expected [seq_len, num_states, num_heads, head_dim]",
        )
    seq, _, heads, d = v.shape
    v_out = torch.empty((seq, heads, d), dtype=v.dtype)
    s_out = torch.empty((seq, heads), dtype=torch.float32)
    _flashpage.merge_states(_c(v), s, v_out, s_out)
    return v_out, s_out


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if not isinstance(t, torch.Tensor) or t.is_contiguous() else t.contiguous()


def append_paged_kv_cache(
    append_key: torch.Tensor,
    append_value: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    paged_kv_cache: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    kv_layout: str = "NHD",
) -> None:
    """Writes ``append_key``/``append_value`` [nnz, num_kv_heads, head_dim] into the paged
    cache: row ``i`` becomes token ``positions[i]`` of request ``batch_indices[i]``. The page
    table (``kv_indices``, ``kv_indptr``, ``kv_last_page_len``) describes the cache *after*
    the append, as in FlashInfer; it and every target slot are checked before anything is
    written."""
    _flashpage.append_paged_kv_cache(
        append_key,
        append_value,
        batch_indices,
        positions,
        paged_kv_cache,
        kv_indices,
        kv_indptr,
        kv_last_page_len,
        kv_layout,
    )


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV length of every request from the page table:
    ``max(pages - 1, 0) * page_size + last_page_len`` (FlashInfer's formula)."""
    pages = kv_indptr[1:] - kv_indptr[:-1]
    return (torch.clamp(pages - 1, min=0) * page_size + kv_last_page_len).to(torch.int32)


def get_batch_indices_positions(
    append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For ``nnz`` appended rows (request ``r`` appends rows ``append_indptr[r]:append_indptr[r+1]``
    at the end of its ``seq_lens[r]`` tokens), the request and the position of every row."""
    counts = (append_indptr[1:] - append_indptr[:-1]).to(torch.int64)
    batch = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts)
    if batch.numel() != nnz:
        raise _error(
            "ArrayLength",
            f"append_indptr has {batch.numel()} rows in total, expected {nnz} (nnz)",
        )
    starts = append_indptr[:-1].to(torch.int64)
    offset = torch.arange(nnz, dtype=torch.int64) - starts[batch.long()]
    positions = (seq_lens.to(torch.int64)[batch.long()] - counts[batch.long()] + offset).to(torch.int32)
    return batch, positions
