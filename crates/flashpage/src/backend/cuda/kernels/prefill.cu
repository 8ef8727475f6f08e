// Tensor-core prefill over a plan's work items, FlashAttention-2 style (sm_80+, f16/bf16).
//
// Grid (work-item capacity, num_kv_heads); block 128 threads = 4 warps. A block runs one
// (work item, KV head) pair: the item's packed q rows (packed row p = query row p / group,
// head kvh * group + p % group: GQA packs the query heads of one KV head into the M
// dimension) in passes of 64, 16 per warp, against the item's KV chunk in tiles of FP_BLOCK_N
// tokens.
//
// Per tile: the page ids of the tile are resolved once into shared memory (one 64-bit element
// offset per token, by warp 0, a tile ahead), K and V are copied global -> shared with
// cp.async (16 bytes per copy; tokens without a valid page are zero-filled), S = Q K^T with
// mma.sync.m16n8k16 (Q fragments in registers for the whole pass, K fragments with
// ldmatrix), online softmax on the f32 accumulators in registers (base-2 exponentials), P is
// rounded to the dtype and reused in registers as the A operand of O += P V (V fragments
// with ldmatrix.trans). The copy of V[j] overlaps S and the softmax of tile j; the copy of
// K[j + 1] overlaps P V of tile j.
//
// Semantics are those of decode.cu (and the CPU backend): causal bottom-right aligned, sliding
// window, soft-cap, ALiBi, sm_scale, LSE, split rows written as f32 partial states for
// merge.cu, paged or ragged K/V, out-of-range page ids skipped, empty rows o = 0 and
// lse = -inf. A key a row cannot see contributes exactly nothing, even when its V is +-inf or
// NaN: a tile that is not visible to every row of a warp (the causal diagonal, the window
// edge, the chunk's tail, an invalid page, any tile under a custom mask) is scanned for non-finite V; if it holds any, the
// warp multiplies P by V with those elements zeroed and adds the non-finite values of the
// keys each row does see back afterwards (a rare, slow path).
//
// An FP8 K/V cache (FP_KV_DTYPE 3 or 4): each thread loads 8 code bytes with an ordinary load,
// converts them exactly to q's 16-bit type and stores 16 bytes to the tile (no cp.async, so
// the copy of a tile is not overlapped with the tensor-core work the way cp.async overlaps
// it); k_scale is folded into the score scale and v_scale into the output normalisation, in
// f32.
//
// Extra defines: FP_BLOCK_N (tokens per K/V tile: 16, 32 or 64), FP_MIN_BLOCKS (resident
// blocks per SM the register budget is set for), FP_PREFILL (1).

#define D FP_HEAD_DIM
#define BN FP_BLOCK_N
#define PF_THREADS 128
#define PF_WARPS 4
#define BM (16 * PF_WARPS)
#define KSTEPS (D / 16)
#define NTILES (BN / 8)
#define DTILES (D / 8)
#define SROW (D + 8)
#define CHUNKS (D / 8)

#if FP_DTYPE == 0
#error "the tensor-core prefill kernel takes f16 or bf16 (f32 runs on decode.cu)"
#endif
#if D % 16 != 0 || BN % 16 != 0 || BN > 64 || BN < 16
#error "FP_HEAD_DIM must be a multiple of 16 and FP_BLOCK_N one of 16, 32, 64"
#endif

#ifndef FP_HOST_EMULATION
__device__ __forceinline__ u32 pf_smem(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, register j
// receives it (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
__device__ __forceinline__ void pf_ldsm_x4(u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(pf_smem(row))
                 : "memory");
}

__device__ __forceinline__ void pf_ldsm_x4_trans(u32* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(pf_smem(row))
                 : "memory");
}

// d += a b for a 16x16 A (row major) and a 16x8 B (column major), f32 accumulators.
__device__ __forceinline__ void pf_mma(float* d, const u32* a, const u32* b) {
#if FP_DTYPE == 2
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void pf_cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(pf_smem(dst)), "l"(src)
                 : "memory");
}

__device__ __forceinline__ void pf_cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void pf_cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}

// Two f32 rounded to the dtype in one register, `lo` in the low half.
__device__ __forceinline__ u32 pf_pack2(float lo, float hi) {
    u32 r;
#if FP_DTYPE == 2
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
#endif  // FP_HOST_EMULATION (host_emulation.cpp provides these on the host)

// Exponent-all-ones mask of the dtype's 16-bit halves (inf and NaN).
#if FP_DTYPE == 2
#define PF_EXP 0x7f80u
#else
#define PF_EXP 0x7c00u
#endif

__device__ __forceinline__ bool pf_half_nonfinite(u32 h) {
    return (h & PF_EXP) == PF_EXP;
}

__device__ __forceinline__ bool pf_word_nonfinite(u32 w) {
    return pf_half_nonfinite(w & 0xffffu) || pf_half_nonfinite(w >> 16);
}

// The word with its non-finite halves zeroed.
__device__ __forceinline__ u32 pf_sanitize(u32 w) {
    if (pf_half_nonfinite(w & 0xffffu)) {
        w &= 0xffff0000u;
    }
    if (pf_half_nonfinite(w >> 16)) {
        w &= 0xffffu;
    }
    return w;
}

__device__ __forceinline__ float pf_half_to_f32(u32 h) {
#if FP_DTYPE == 2
    return __uint_as_float((h & 0xffffu) << 16);
#else
    return f16_bits_to_f32(h);
#endif
}

// Online-softmax weight of score x (base-2 units) under running max mx: the limit when mx is
// +inf (logits past the f32 range: the +inf scores share the weight equally, as fp_weight).
static __device__ __forceinline__ float pf_weight2(float x, float mx) {
    if (mx == FP_INF) {
        return x == FP_INF ? 1.f : 0.f;
    }
    return ex2(x - mx);
}


static __device__ __forceinline__ float pf_alibi_slope(int h, int num_heads) {
    int n = 1;
    while (n * 2 <= num_heads) {
        n *= 2;
    }
    double e;
    if (h < n) {
        e = -8.0 * (double)(h + 1) / (double)n;
    } else {
        e = -4.0 * (2.0 * (double)(h + 1 - n) - 1.0) / (double)n;
    }
    return (float)exp2(e);
}

// Warp 0: element offsets of the tile's tokens [t0, t0 + BN) in K (`off`) and in V (`voff`,
// V's own strides) (-1: no token: past `end` or an out-of-range page id) and whether every
// token has one.
static __device__ __forceinline__ void pf_fill_offsets(const Params& p, i64 t0, i64 end,
                                                       int kv_start, int kvh, int lane,
                                                       i64* off, i64* voff, int* all_valid) {
    const int* idx = (const int*)p.kv_indices;
    bool ok = true;
#pragma unroll
    for (int n = lane; n < BN; n += 32) {
        const i64 t = t0 + n;
        i64 o = -1;
        i64 vo = -1;
        if (t < end) {
            if (p.paged) {
                const int pg = fp_div_ps(p, (int)t);
                const int id = idx[(i64)kv_start + pg];
                if (id >= 0 && id < p.num_pages) {
                    const i64 slot = (i64)t - (i64)pg * p.page_size;
                    o = (i64)id * p.stride_page + slot * p.stride_token + (i64)kvh * p.stride_head;
                    vo = (i64)id * p.v_stride_page + slot * p.v_stride_token +
                         (i64)kvh * p.v_stride_head;
                }
            } else {
                o = ((i64)kv_start + t) * p.stride_page + (i64)kvh * p.stride_head;
                vo = ((i64)kv_start + t) * p.v_stride_page + (i64)kvh * p.v_stride_head;
            }
        }
        ok = ok && o >= 0;
        off[n] = o;
        voff[n] = vo;
    }
    const bool all = __all_sync(FP_FULL_MASK, ok);
    if (lane == 0) {
        *all_valid = all ? 1 : 0;
    }
}

// Copies one K or V tile into shared memory (cp.async; tokens without an offset are zeroed).
static __device__ __forceinline__ void pf_load_tile(u16* dst, const char* base, const i64* off,
                                                    int tid) {
#pragma unroll 4
    for (int c = tid; c < BN * CHUNKS; c += PF_THREADS) {
        const int n = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        const i64 o = off[n];
        u16* d = dst + n * SROW + col;
        if (o >= 0) {
#if FP_KV_FP8
            // FP8 codes converted to q's 16-bit type on the way to shared memory: exact
            // (every e4m3fn and e5m2 value, subnormals, infinities and NaN included, is an
            // f16 and a bf16), so the tile holds the codes' values; the scales are applied
            // in f32 to the scores and the outputs.
            KvRaw8 r;
            kv_load_stream(r, base + (o + col));
            float f[8];
            kv_to_f32(r, f);
            V4 x;
            x.x = f32_to_pair(f[0], f[1]);
            x.y = f32_to_pair(f[2], f[3]);
            x.z = f32_to_pair(f[4], f[5]);
            x.w = f32_to_pair(f[6], f[7]);
            *reinterpret_cast<V4*>(d) = x;
#else
            pf_cp_async16(d, base + (o + col) * FP_ELEM_BYTES);
#endif
        } else {
            V4 z;
            z.x = z.y = z.z = z.w = 0u;
            *reinterpret_cast<V4*>(d) = z;
        }
    }
}

extern "C" __global__ void __launch_bounds__(PF_THREADS, FP_MIN_BLOCKS)
    fp_prefill(const __grid_constant__ Params p) {
    // K and V tiles, rows padded by 16 bytes (ldmatrix's 8 row reads hit distinct banks);
    // declared as V4 for 16-byte alignment.
    __shared__ V4 sK4[BN * SROW / 8];
    __shared__ V4 sV4[BN * SROW / 8];
    u16* const sK = reinterpret_cast<u16*>(sK4);
    u16* const sV = reinterpret_cast<u16*>(sV4);
    __shared__ i64 sOff[2][BN];
    __shared__ i64 sVOff[2][BN];
    __shared__ int sAll[2];

    const int w = blockIdx.x;
    const int kvh = blockIdx.y;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int hq = p.num_qo_heads;
    const int group = p.group;

    WorkItem it;
    if (!fp_work_item(p, w, it)) {
        return;  // a padded item (graph mode), or ranges outside the buffers
    }
    const auto [row_start, row_end, item_lo, item_hi, partial, qo_start, qo_len, kv_start,
                kv_len] = it;

    const i64 shift = (i64)kv_len - (i64)qo_len;
    // Custom mask: row i = qpos - shift starts at bit base + i * kv_len, i.e. at
    // (base - shift * kv_len) + qpos * kv_len (read only when the run has a mask).
    const i64 mrow = (i64)kv_len;
    const i64 mbase = fp_mask_base(p, w) - shift * mrow;
#if FP_KV_FP8
    const float qk_scale = p.sm_scale * fp_kv_scale(p.k_scale, kvh);
    const float v_scale = fp_kv_scale(p.v_scale, kvh);
#else
    const float qk_scale = p.sm_scale;
    const float v_scale = 1.f;
#endif
    const char* kbase = (const char*)p.k;
    const char* vbase = (const char*)p.v;
    // Visible keys of query row i: [lo(i), hi(i)], both monotone in i.
#define PF_LO(i) (p.window_left >= 0 ? (i64)(i) + shift - (i64)p.window_left : (i64)0)
#define PF_HI(i) (p.causal ? (i64)(i) + shift : (i64)kv_len - 1)

    for (int pass = row_start; pass < row_end; pass += BM) {
        const int nrows = row_end - pass < BM ? row_end - pass : BM;
        // Token range of the block (all its rows) and of this warp's rows.
        const int bi0 = pass / group;
        const int bi1 = (pass + nrows - 1) / group;
        i64 start = PF_LO(bi0);
        start = start > (i64)item_lo ? start : (i64)item_lo;
        start = start > 0 ? start : 0;
        i64 end = PF_HI(bi1) + 1;
        end = end < (i64)item_hi ? end : (i64)item_hi;
        end = end > start ? end : start;
        const int ntiles = (int)((end - start + BN - 1) / BN);

        int wn = nrows - warp * 16;
        wn = wn < 0 ? 0 : (wn > 16 ? 16 : wn);
        const int wrow = pass + warp * 16;
        i64 w_lo_min = 0, w_lo_max = 0, w_hi_min = -1, w_hi_max = -1;
        if (wn > 0) {
            const int wi0 = wrow / group;
            const int wi1 = (wrow + wn - 1) / group;
            w_lo_min = PF_LO(wi0);
            w_lo_max = PF_LO(wi1);
            w_hi_min = PF_HI(wi0);
            w_hi_max = PF_HI(wi1);
        }

        // This thread's two rows (g and g + 8 of the warp's 16).
        bool act[2];
        int ri[2], rh[2], rlo[2], rhi[2], rpos[2];
        float slope[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = g + 8 * h;
            act[h] = r < wn;
            const int pk = wrow + (act[h] ? r : 0);
            ri[h] = pk / group;
            rh[h] = kvh * group + pk % group;
            const i64 qp = (i64)ri[h] + shift;
            i64 lo = PF_LO(ri[h]);
            i64 hi = PF_HI(ri[h]);
            if (!act[h]) {
                lo = 1;
                hi = 0;
            }
            rlo[h] = (int)(lo < -1 ? -1 : lo);
            rhi[h] = (int)(hi < -1 ? -1 : hi);
            rpos[h] = (int)qp;
            slope[h] = p.alibi ? pf_alibi_slope(rh[h], hq) : 0.f;
        }

        // Q fragments (A operand, PTX ISA "Matrix Fragments for mma.m16n8k16 with floating
        // point type"): register 2 * half + h holds row g + 8h, columns 16 kk + 8 half + 2 t4
        // and + 1.
        u32 qf[KSTEPS][4];
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    u32 x = 0u;
                    if (act[h]) {
                        const char* qb = (const char*)p.q;
                        const i64 e = ((i64)qo_start + ri[h]) * p.q_row + (i64)rh[h] * p.q_head +
                                      kk * 16 + half * 8 + 2 * t4;
                        x = *reinterpret_cast<const u32*>(qb + e * FP_ELEM_BYTES);
                    }
                    qf[kk][2 * half + h] = x;
                }
            }
        }

        float oacc[DTILES][4];
#pragma unroll
        for (int dn = 0; dn < DTILES; ++dn) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                oacc[dn][e] = 0.f;
            }
        }
        float m[2] = {FP_NEG_INF, FP_NEG_INF};
        float l[2] = {0.f, 0.f};

        __syncthreads();  // the previous pass is done with shared memory
        if (warp == 0 && ntiles > 0) {
            pf_fill_offsets(p, start, end, kv_start, kvh, lane, sOff[0], sVOff[0], &sAll[0]);
        }
        __syncthreads();
        if (ntiles > 0) {
            pf_load_tile(sK, kbase, sOff[0], tid);
            pf_cp_async_commit();
        }

        for (int j = 0; j < ntiles; ++j) {
            const int buf = j & 1;
            const i64 t0 = start + (i64)j * BN;
            pf_cp_async_wait_all();
            __syncthreads();  // K[j] is in; every warp is done with V[j - 1]
            pf_load_tile(sV, vbase, sVOff[buf], tid);
            pf_cp_async_commit();
            if (warp == 0 && j + 1 < ntiles) {
                pf_fill_offsets(p, t0 + BN, end, kv_start, kvh, lane, sOff[buf ^ 1],
                                sVOff[buf ^ 1], &sAll[buf ^ 1]);
            }
            // Whether this warp's rows see any key of the tile, and whether they all see
            // every key of it (then no mask is needed).
            const bool sees = wn > 0 && t0 <= w_hi_max && t0 + BN - 1 >= w_lo_min;
            const bool full = sAll[buf] != 0 && t0 >= w_lo_max && t0 + BN - 1 <= w_hi_min &&
                              p.mask == 0;
            u32 pa[BN / 16][4];
            if (sees) {
                float s[NTILES][4];
#pragma unroll
                for (int jn = 0; jn < NTILES; ++jn) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[jn][e] = 0.f;
                    }
                }
                // S = Q K^T. B (16 x 8, K x N) is K's rows as stored: ldmatrix without .trans
                // gives lane (g, t4) tokens g, dims 2 t4, 2 t4 + 1 (and + 8): b0..b3.
#pragma unroll
                for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
                    for (int jn = 0; jn < NTILES; jn += 2) {
                        u32 b[4];
                        const int tok = jn * 8 + (lane >> 4) * 8 + (lane & 7);
                        const int dim = kk * 16 + ((lane >> 3) & 1) * 8;
                        pf_ldsm_x4(b, sK + tok * SROW + dim);
                        pf_mma(s[jn], qf[kk], b);
                        pf_mma(s[jn + 1], qf[kk], b + 2);
                    }
                }
                // Scores in base-2 units, masked; C fragment: s[jn][2h + e] is row g + 8h,
                // token 8 jn + 2 t4 + e.
#pragma unroll
                for (int jn = 0; jn < NTILES; ++jn) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int h = e >> 1;
                        const int n = jn * 8 + 2 * t4 + (e & 1);
                        const int t = (int)(t0 + n);
                        float x = s[jn][e] * qk_scale;
                        if (p.has_soft_cap) {
                            x = p.soft_cap * tanhf(x / p.soft_cap);
                        }
                        if (p.alibi) {
                            x += slope[h] * (float)((i64)t - (i64)rpos[h]);
                        }
                        bool vis = true;
                        if (!full) {
                            vis = sOff[buf][n] >= 0 && t >= rlo[h] && t <= rhi[h] &&
                                  (p.mask == 0 || fp_mask_visible(p, mbase + (i64)rpos[h] * mrow + t));
                        }
                        s[jn][e] = vis ? x * FP_LOG2E : FP_NEG_INF;
                    }
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float mx = FP_NEG_INF;
#pragma unroll
                    for (int jn = 0; jn < NTILES; ++jn) {
                        mx = fmaxf(mx, fmaxf(s[jn][2 * h], s[jn][2 * h + 1]));
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(FP_FULL_MASK, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(FP_FULL_MASK, mx, 2));
                    const float mn = fmaxf(m[h], mx);
                    // A row that has seen no key yet keeps m = -inf and exponentiates
                    // against 0 (every p is then 0).
                    const float base = mn == FP_NEG_INF ? 0.f : mn;
                    const float corr = pf_weight2(m[h], base);
                    m[h] = mn;
                    float sum = 0.f;
#pragma unroll
                    for (int jn = 0; jn < NTILES; ++jn) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float pr = pf_weight2(s[jn][2 * h + e], base);
                            s[jn][2 * h + e] = pr;
                            sum += pr;
                        }
                    }
                    l[h] = l[h] * corr + sum;
#pragma unroll
                    for (int dn = 0; dn < DTILES; ++dn) {
                        oacc[dn][2 * h] *= corr;
                        oacc[dn][2 * h + 1] *= corr;
                    }
                }
                // P as the A operand of P V: k-step c covers tokens 16c..16c+15, i.e. the C
                // fragments of n-tiles 2c (a0..a3) and 2c + 1 (a4..a7).
#pragma unroll
                for (int c = 0; c < BN / 16; ++c) {
                    pa[c][0] = pf_pack2(s[2 * c][0], s[2 * c][1]);
                    pa[c][1] = pf_pack2(s[2 * c][2], s[2 * c][3]);
                    pa[c][2] = pf_pack2(s[2 * c + 1][0], s[2 * c + 1][1]);
                    pa[c][3] = pf_pack2(s[2 * c + 1][2], s[2 * c + 1][3]);
                }
            }
            pf_cp_async_wait_all();
            __syncthreads();  // V[j] is in; every warp is done with K[j]
            if (j + 1 < ntiles) {
                pf_load_tile(sK, kbase, sOff[buf ^ 1], tid);
                pf_cp_async_commit();
            }
            if (sees) {
                // Non-finite V in a tile some row of the warp cannot fully see: rare path.
                bool fix = false;
                if (!full) {
                    bool bad = false;
                    for (int c = lane; c < BN * CHUNKS; c += 32) {
                        const V4 x = *reinterpret_cast<const V4*>(sV + (c / CHUNKS) * SROW +
                                                                  (c % CHUNKS) * 8);
                        bad = bad || pf_word_nonfinite(x.x) || pf_word_nonfinite(x.y) ||
                              pf_word_nonfinite(x.z) || pf_word_nonfinite(x.w);
                    }
                    fix = __any_sync(FP_FULL_MASK, bad);
                }
                // O += P V. B (16 x 8, K x N) is V's rows transposed: ldmatrix.trans gives lane
                // (g, t4) tokens 2 t4, 2 t4 + 1 (and + 8), dim g: b0..b3.
#pragma unroll
                for (int c = 0; c < BN / 16; ++c) {
#pragma unroll
                    for (int dn = 0; dn < DTILES; dn += 2) {
                        u32 b[4];
                        const int tok = c * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                        const int dim = (dn + (lane >> 4)) * 8;
                        pf_ldsm_x4_trans(b, sV + tok * SROW + dim);
                        if (fix) {
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                b[e] = pf_sanitize(b[e]);
                            }
                        }
                        pf_mma(oacc[dn], pa[c], b);
                        pf_mma(oacc[dn + 1], pa[c], b + 2);
                    }
                }
                if (fix) {
                    // The zeroed values, for the keys each row sees: +-inf or NaN, as the
                    // product p * V of any positive weight would be.
                    for (int h = 0; h < 2; ++h) {
                        for (int n = 0; n < BN; ++n) {
                            const int t = (int)(t0 + n);
                            if (sOff[buf][n] < 0 || t < rlo[h] || t > rhi[h] ||
                                (p.mask != 0 && !fp_mask_visible(p, mbase + (i64)rpos[h] * mrow + t))) {
                                continue;
                            }
                            for (int dn = 0; dn < DTILES; ++dn) {
                                for (int e = 0; e < 2; ++e) {
                                    const u32 x = sV[n * SROW + dn * 8 + 2 * t4 + e];
                                    if (pf_half_nonfinite(x)) {
                                        oacc[dn][2 * h + e] += pf_half_to_f32(x);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }

        // Epilogue: the four lanes of a row hold parts of its sum.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[h];
            sum += __shfl_xor_sync(FP_FULL_MASK, sum, 1);
            sum += __shfl_xor_sync(FP_FULL_MASK, sum, 2);
            if (!act[h]) {
                continue;
            }
            float lse = FP_NEG_INF;
            float inv = 0.f;
            // A NaN sum (a NaN score the row sees) makes the row NaN, o and lse.
            if (sum > 0.f || sum != sum) {
                inv = v_scale / sum;  // v_scale: 1 for a float cache
                lse = (m[h] + log2f(sum)) * FP_LN2;
            }
            const int i = ri[h];
            const int hh = rh[h];
            if (partial >= 0) {
                const i64 prow = (i64)partial + i;
                float* po = (float*)p.partial_o + (prow * hq + hh) * D;
#pragma unroll
                for (int dn = 0; dn < DTILES; ++dn) {
                    float* d = po + dn * 8 + 2 * t4;
                    d[0] = oacc[dn][2 * h] * inv;
                    d[1] = oacc[dn][2 * h + 1] * inv;
                }
                if (t4 == 0) {
                    ((float*)p.partial_lse)[prow * hq + hh] = lse;
                }
            } else {
                const i64 row = (i64)qo_start + i;
                inv *= sink_epilogue(p, hh, &lse);  // attention sinks (factor 1 without)
                char* ob = (char*)p.o + (row * p.o_row + (i64)hh * p.o_head) * FP_ELEM_BYTES;
#pragma unroll
                for (int dn = 0; dn < DTILES; ++dn) {
                    *reinterpret_cast<u32*>(ob + (dn * 8 + 2 * t4) * FP_ELEM_BYTES) =
                        f32_to_pair(oacc[dn][2 * h] * inv, oacc[dn][2 * h + 1] * inv);
                }
                if (t4 == 0 && p.lse != 0) {
                    ((float*)p.lse)[row * hq + hh] = lse;
                }
            }
        }
    }
#undef PF_LO
#undef PF_HI
}
