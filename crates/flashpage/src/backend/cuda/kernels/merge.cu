// Split-KV merge: one block per merge row of the plan (grid = merge-row capacity) combines
// the row's `count` partial states (partial rows first, first + stride, ...) for every query
// head into o (and lse), stably: lse = max + ln(sum exp(lse_i - max)),
// o = sum exp(lse_i - max) o_i / sum exp(lse_i - max), with the CPU merge's rules for
// non-finite states (a NaN lse makes the row NaN; +inf lses share the weight). Padded merge
// rows (row < 0) return at once; rows whose fields fall outside the buffers do too. The
// attention-sink epilogue, if the run has sinks, applies to the merged state.

#define D FP_HEAD_DIM
#define VPH (D / 8)

extern "C" __global__ void fp_merge(const __grid_constant__ Params p) {
    const int m = blockIdx.x;
    const int* mm = (const int*)p.int_ws + p.merge_off;
    const int mc = p.merge_cap;
    const int row = mm[m];
    if (row < 0) {
        return;
    }
    const int first = mm[mc + m];
    const int count = mm[2 * mc + m];
    const int stride = mm[3 * mc + m];
    const int hq = p.num_qo_heads;
    if (first < 0 || count < 0 || stride < 0 || (i64)row + 1 > p.qo_rows ||
        (count > 0 && (i64)first + (i64)(count - 1) * stride >= p.partial_cap)) {
        return;
    }
    const float* plse = (const float*)p.partial_lse;
    const float* po = (const float*)p.partial_o;
    for (int idx = threadIdx.x; idx < hq * VPH; idx += blockDim.x) {
        const int h = idx / VPH;
        const int e0 = (idx % VPH) * 8;
        float mx = FP_NEG_INF;
        bool nan = false;
        for (int c = 0; c < count; ++c) {
            const float li = plse[((i64)first + (i64)c * stride) * hq + h];
            mx = fmaxf(mx, li);
            nan |= li != li;
        }
        float out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            out[e] = nan ? FP_QNAN : 0.f;
        }
        // A partial state poisoned by non-finite inputs (lse NaN) makes the row NaN.
        float lse = nan ? FP_QNAN : FP_NEG_INF;
        if (!nan && mx != FP_NEG_INF) {
            float sum = 0.f;
            for (int c = 0; c < count; ++c) {
                const i64 prow = (i64)first + (i64)c * stride;
                const float li = plse[prow * hq + h];
                // Past the f32 range (mx = +inf) the merge is the limit: the +inf states
                // share the weight equally.
                const float wgt = fp_weight(li, mx);
                if (li == FP_NEG_INF || wgt == 0.f) {
                    continue;
                }
                sum += wgt;
                float x[8];
                load8_f32(po + (prow * hq + h) * D + e0, x);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    out[e] = fmaf(wgt, x[e], out[e]);
                }
            }
            const float inv = 1.f / sum;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                out[e] *= inv;
            }
            lse = mx + logf(sum);
        }
        const float f = sink_epilogue(p, h, &lse);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            out[e] *= f;
        }
        char* ob = (char*)p.o;
        store8(ob + ((i64)row * p.o_row + (i64)h * p.o_head + e0) * FP_ELEM_BYTES, out);
        if (e0 == 0 && p.lse != 0) {
            ((float*)p.lse)[(i64)row * hq + h] = lse;
        }
    }
}


// Cascade fold (docs/cascade.md): after every level of a cascade has written its state
// (o in the storage dtype, f32 lse) into the float workspace, one block per query row
// folds the levels' states of every query head, level by level, into f32 registers with
// the CPU fold's rules (backend/cpu/cascade.rs): an empty state (lse -inf) adds nothing, a
// NaN state makes the row NaN, past the f32 range the +inf states share the weight; then
// normalises, applies the attention sinks once and writes o (and lse). A parameter block
// of its own (the levels' Params describe the levels' runs, not the fold).
struct FoldParams {
    u64 level_o;    // level l's o at level_o + l * o_stride bytes: [rows, hq, D]
    u64 level_lse;  // level l's lse at level_lse + l * lse_stride bytes: [rows, hq]
    u64 o;          // [rows, hq, D] storage dtype
    u64 lse;        // [rows, hq] f32, 0 when not written
    u64 sinks;      // [hq] f32, 0 without sinks
    i64 o_stride;
    i64 lse_stride;
    i64 rows;
    int num_levels;
    int num_qo_heads;
};

// The sink epilogue of common.cuh's sink_epilogue, for the fold's parameter block. A copy on
// purpose: sharing one body through a u64 argument gave the RoPE decode variants a 40–72-byte
// stack frame in NVRTC 13's report (tests/nvrtc_compile.rs), so sink_epilogue reads Params.
__device__ __forceinline__ float fold_sink(const FoldParams& p, int h, float* lse) {
    if (p.sinks == 0) {
        return 1.f;
    }
    const float s = ((const float*)p.sinks)[h];
    if (s == FP_NEG_INF) {
        return 1.f;
    }
    const float l = *lse;
    if (l >= s) {
        const float t = expf(s - l);
        *lse = l + log1pf(t);
        return 1.f / (1.f + t);
    }
    const float t = expf(l - s);
    *lse = s + log1pf(t);
    return t / (1.f + t);
}

extern "C" __global__ void fp_cascade_fold(const __grid_constant__ FoldParams p) {
    const int row = blockIdx.x;
    if ((i64)row >= p.rows) {
        return;
    }
    const int hq = p.num_qo_heads;
    const int vph = FP_HEAD_DIM / 8;
    for (int idx = threadIdx.x; idx < hq * vph; idx += blockDim.x) {
        const int h = idx / vph;
        const int e0 = (idx % vph) * 8;
        const i64 state = (i64)row * hq + h;
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            acc[e] = 0.f;
        }
        float sum = 0.f;
        float mx = FP_NEG_INF;
        for (int l = 0; l < p.num_levels; ++l) {
            const float li =
                ((const float*)((const char*)p.level_lse + (i64)l * p.lse_stride))[state];
            if (mx != mx || li == FP_NEG_INF) {
                continue;
            }
            if (li != li) {
                mx = FP_QNAN;
                continue;
            }
            if (li > mx) {
                const float scale = (li == FP_INF || mx == FP_NEG_INF) ? 0.f : expf(mx - li);
                sum *= scale;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[e] *= scale;
                }
                mx = li;
            }
            const float w = mx == FP_INF ? (li == FP_INF ? 1.f : 0.f) : expf(li - mx);
            if (w == 0.f) {
                continue;
            }
            sum += w;
            Raw8 r;
            raw_load_ro(r, (const char*)p.level_o + (i64)l * p.o_stride +
                               (state * FP_HEAD_DIM + e0) * FP_ELEM_BYTES);
            float x[8];
            raw_to_f32(r, x);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                acc[e] = fmaf(w, x[e], acc[e]);
            }
        }
        float f, lse;
        if (mx != mx) {
            f = FP_QNAN;
            lse = FP_QNAN;
        } else if (mx == FP_NEG_INF || sum == 0.f) {
            f = 0.f;
            lse = FP_NEG_INF;
        } else if (mx == FP_INF) {
            f = 1.f / sum;
            lse = FP_INF;
        } else {
            f = 1.f / sum;
            lse = mx + logf(sum);
        }
        f *= fold_sink(p, h, &lse);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            acc[e] *= f;
        }
        store8((char*)p.o + (state * FP_HEAD_DIM + e0) * FP_ELEM_BYTES, acc);
        if (e0 == 0 && p.lse != 0) {
            ((float*)p.lse)[state] = lse;
        }
    }
}
