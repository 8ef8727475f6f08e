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
