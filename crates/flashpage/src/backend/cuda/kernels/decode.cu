// Paged attention over a plan's work items (decode, and prefill tiles on the same path).
//
// Grid (work-item capacity, num_kv_heads); block FP_THREADS threads. A block runs one
// (work item, KV head) pair: all packed q rows of the item (a decode item is one request's
// whole GQA group), FP_ROWS rows per pass, against the item's KV chunk. Every K/V row is read
// once per pass and serves every q row of the pass.
//
// Threads: FP_TPR consecutive threads (a power of two) own one token at a time, 8 elements
// of the head dimension each (one 16-byte load for 16-bit dtypes); FP_NT / FP_TPR such
// "token groups" walk the chunk with stride FP_NTG, FP_UNROLL tokens per batch. Each token
// group keeps its own online-softmax state; the groups are merged through shared memory at
// the end of a pass. Loads are software pipelined: while batch b is computed, the K/V rows of
// batch b + 1 are in flight and the page ids of batch b + 2 are being fetched.
//
// Padded work items (request < 0) return at once; so do items whose fields fall outside the
// buffers described in the parameters, so no int image can make the kernel read or write out
// of bounds.
//
// An FP8 K/V cache (FP_KV_DTYPE 3 or 4): 8 bytes per thread per token, decoded exactly to f32
// in registers; k_scale multiplies the score with sm_scale, v_scale the normalised output.
//
// Extra defines: FP_TPR, FP_ROWS, FP_UNROLL, FP_THREADS, FP_ROPE (0/1), FP_MIN_BLOCKS (the
// resident blocks per SM the register budget is set for: __launch_bounds__' second argument).

#define D FP_HEAD_DIM
#define TPR FP_TPR
#define NT FP_THREADS
#define NTG (NT / TPR)
#define ROWS FP_ROWS
#define U FP_UNROLL
#define TILE (NTG * U)
#define LANES_USED (D / 8)

#if (TPR & (TPR - 1)) != 0 || TPR < LANES_USED || TPR > 32 || NT % TPR != 0
#error "FP_TPR must be a power of two in [D/8, 32] dividing FP_THREADS"
#endif


static __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) {
        x += __shfl_xor_sync(FP_FULL_MASK, x, off, TPR);
    }
    return x;
}

#if FP_ROPE
// RoPE angles without floating-point range reduction. The table holds, per frequency f, the
// rotation per position in turns as an unsigned 0.64 fixed-point fraction (w_f =
// theta^(-2f/D) / rope_scale / 2pi mod 1, formed once per block in the prologue). The angle
// of position t is t * w_f mod 1 turn: its top 32 bits are exact integer arithmetic (a
// 32x64-bit product, two multiplies), so the angle at position 1e6 is as accurate as at 0,
// and sincospif of the resulting half-turn fraction in [-1, 1) needs no slow path.
struct RopeW {
    u32 lo, hi;
};

// sin and cos of position `pos` (any int) times the table entry.
static __device__ __forceinline__ void rope_sincos(int pos, RopeW w, float* s, float* c) {
    const u32 t = (u32)pos;
    // Top 32 bits of the low 64 bits of sign-extended pos times (hi:lo).
    u32 turns = t * w.hi + __umulhi(t, w.lo);
    if (pos < 0) {
        turns -= w.lo;
    }
    // Signed fraction of a turn, as half-turns in [-1, 1).
    const float half_turns = (float)(int)turns * 4.656612873077393e-10f;  // 2^-31
    sincospif(half_turns, s, c);
}

// Rotate-half RoPE of this thread's 8 elements at position `pos`. The partner of element f is
// f +- D/2, held by lane +- D/16 of the same group. Every lane of the warp must call this
// (it shuffles).
static __device__ __forceinline__ void rope8(float* x, int pos, const RopeW* table, int lane) {
    const int half_lanes = D / 16;
    const bool lower = lane < half_lanes;
    const int src = lower ? lane + half_lanes : lane - half_lanes;
    const int base = (lower ? lane : lane - half_lanes) * 8;
    float other[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        other[e] = __shfl_sync(FP_FULL_MASK, x[e], src, TPR);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        float s, c;
        // Lanes past D/8 (padding) read entry 0: their values are zero and unused.
        rope_sincos(pos, table[lane < LANES_USED ? base + e : e], &s, &c);
        x[e] = lower ? x[e] * c - other[e] * s : x[e] * c + other[e] * s;
    }
}

// The per-position rotation of frequency f in turns, as a 0.64 fixed-point fraction.
static __device__ __forceinline__ RopeW rope_w(int f, float theta, float scale) {
    double w = pow((double)theta, -2.0 * (double)f / (double)D) / (double)scale *
               0.15915494309189535;
    w -= floor(w);
    const double hi = floor(w * 4294967296.0);
    const double lo = floor((w * 4294967296.0 - hi) * 4294967296.0);
    RopeW r;
    r.hi = (u32)hi;
    r.lo = (u32)lo;
    return r;
}
#endif

static __device__ __forceinline__ float alibi_slope(int h, int num_heads) {
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

// Fetches the page ids of batch b (-1: no token).
static __device__ __forceinline__ void fetch_pages(const Params& p, int b, i64 start, i64 end,
                                                   int kv_start, int tg, int* pid) {
    const int* idx = (const int*)p.kv_indices;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const i64 t = start + (i64)b * TILE + u * NTG + tg;
        int id = -1;
        if (t < end) {
            if (p.paged) {
                id = __ldg(idx + (i64)kv_start + fp_div_ps(p, (int)t));
                if (id < 0 || id >= p.num_pages) {
                    id = -1;
                }
            } else {
                id = 0;
            }
        }
        pid[u] = id;
    }
}

// Issues the K and V loads of batch b.
static __device__ __forceinline__ void load_kv(const Params& p, int b, i64 start, int kv_start,
                                               int kvh, int tg, int lane, const int* pid,
                                               KvRaw8* kr, KvRaw8* vr) {
    const char* kbase = (const char*)p.k;
    const char* vbase = (const char*)p.v;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int t = (int)(start + (i64)b * TILE + u * NTG + tg);
        if (pid[u] >= 0 && lane < LANES_USED) {
            i64 off, voff;
            if (p.paged) {
                const int pg = fp_div_ps(p, t);
                const i64 slot = (i64)(t - pg * p.page_size);
                off = (i64)pid[u] * p.stride_page + slot * p.stride_token;
                voff = (i64)pid[u] * p.v_stride_page + slot * p.v_stride_token;
            } else {
                off = ((i64)kv_start + t) * p.stride_page;
                voff = ((i64)kv_start + t) * p.v_stride_page;
            }
            off = (off + (i64)kvh * p.stride_head + lane * 8) * FP_KV_BYTES;
            voff = (voff + (i64)kvh * p.v_stride_head + lane * 8) * FP_KV_BYTES;
            kv_load_stream(kr[u], kbase + off);
            kv_load_stream(vr[u], vbase + voff);
        } else {
            kv_zero(kr[u]);
            kv_zero(vr[u]);
        }
    }
}

// The custom mask of the block's work item: row bits start at sh_mask[0] + qpos * sh_mask[1]
// (written once per block when the run has a mask).
#if !FP_ROPE
__shared__ i64 sh_mask[2];
#endif

struct RowState {
    float q[ROWS][8];
    float acc[ROWS][8];
    float m[ROWS];
    float l[ROWS];
    int lo[ROWS];
    int hi[ROWS];
    int qpos[ROWS];
    float slope[ROWS];
};

// Computes batch b from registers: scores for every row, online softmax, P·V.
static __device__ __forceinline__ void compute(const Params& p, RowState& st, int b, i64 start,
                                               int tg, int lane, const int* pid, const KvRaw8* kr,
                                               const KvRaw8* vr
#if FP_ROPE
                                               , const RopeW* rope_table
#endif
) {
    float s[ROWS][U];  // scores in natural units (scaled, capped, biased)
    bool vis[ROWS][U];
#if FP_KV_FP8
    // An FP8 cache: the score of the codes times k_scale (docs/semantics.md, "FP8 KV cache").
    const float qk_scale = p.sm_scale * fp_kv_scale(p.k_scale, blockIdx.y);
#else
    const float qk_scale = p.sm_scale;
#endif
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float kf[8];
        kv_to_f32(kr[u], kf);
#if FP_ROPE
        {
            const int t = (int)(start + (i64)b * TILE + u * NTG + tg);
            rope8(kf, t, rope_table, lane);
        }
#endif
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float d = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                d = fmaf(st.q[r][e], kf[e], d);
            }
            s[r][u] = group_sum(d) * qk_scale;
        }
    }
    // Not yet here (docs/numerics.md): recomputing scores that overflowed f32 from finite
    // inputs, as the CPU kernels do; a rescaled or f64 recomputation inlined here made the
    // register budget of several variants spill (checked by tests/nvrtc_compile.rs).
    float vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        kv_to_f32(vr[u], vf[u]);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float bmax = FP_NEG_INF;
        bool nan = false;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = (int)(start + (i64)b * TILE + u * NTG + tg);
            vis[r][u] = pid[u] >= 0 && t >= st.lo[r] && t <= st.hi[r];
#if !FP_ROPE
            if (p.mask != 0 && vis[r][u]) {
                // Custom mask: the row's bits start at sh_mask[0] + qpos * sh_mask[1] (in
                // shared memory, so no register holds them across the pipeline).
                vis[r][u] = fp_mask_visible(p, sh_mask[0] + (i64)st.qpos[r] * sh_mask[1] + t);
            }
#endif
            float x = s[r][u];
            if (p.has_soft_cap) {
                x = p.soft_cap * tanhf(x / p.soft_cap);
            }
            if (p.alibi) {
                x += st.slope[r] * (float)((i64)t - (i64)st.qpos[r]);
            }
            if (!vis[r][u]) {
                x = FP_NEG_INF;
            } else if (x != x) {
                // A visible NaN score (non-finite inputs) makes the row NaN, as IEEE
                // arithmetic does in the reference.
                nan = true;
                x = FP_NEG_INF;
            }
            s[r][u] = x;
            bmax = fmaxf(bmax, x);
        }
        if (nan) {
            st.l[r] = FP_QNAN;  // sticky: every later update keeps it NaN
        }
        if (bmax != FP_NEG_INF) {
            const float mn = fmaxf(st.m[r], bmax);
            // 0 when m was -inf, 1 when unchanged.
            const float corr = st.m[r] == mn ? 1.f : fp_weight(st.m[r], mn);
            float l = st.l[r] * corr;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                st.acc[r][e] *= corr;
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                // A key the row cannot see, or whose logit is -inf, contributes exactly
                // nothing: its weight is 0, but 0 * V would still be NaN for V = inf or NaN,
                // so the product is skipped.
                if (s[r][u] != FP_NEG_INF) {
                    const float pr = fp_weight(s[r][u], mn);
                    l += pr;
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        st.acc[r][e] = fmaf(pr, vf[u][e], st.acc[r][e]);
                    }
                }
            }
            st.l[r] = l;
            st.m[r] = mn;
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT, FP_MIN_BLOCKS) fp_decode(const __grid_constant__ Params p) {
    __shared__ float sh_acc[NTG][ROWS][D];
    __shared__ float sh_m[NTG][ROWS];
    __shared__ float sh_l[NTG][ROWS];

    const int w = blockIdx.x;
    const int kvh = blockIdx.y;
    const int tid = threadIdx.x;
    const int tg = tid / TPR;
    const int lane = tid % TPR;
    const int hq = p.num_qo_heads;
    const int group = p.group;

    WorkItem it;
    if (!fp_work_item(p, w, it)) {
        return;  // a padded item (graph mode), or ranges outside the buffers
    }
    const auto [row_start, row_end, item_lo, item_hi, partial, qo_start, qo_len, kv_start,
                kv_len] = it;

#if FP_ROPE
    __shared__ RopeW rope_table[D / 2];
    for (int f = tid; f < D / 2; f += NT) {
        rope_table[f] = rope_w(f, p.rope_theta, p.rope_scale);
    }
    __syncthreads();
#endif

    const i64 shift = (i64)kv_len - (i64)qo_len;
    // Custom mask: row i = qpos - shift starts at bit base + i * kv_len, i.e. at
    // (base - shift * kv_len) + qpos * kv_len. The mask presence is uniform over the block.
    // The RoPE variants have no register left for it (they spilled): the host refuses a mask
    // with RoPE (launch::check_custom_mask).
#if !FP_ROPE
    if (p.mask != 0) {
        if (tid == 0) {
            sh_mask[0] = fp_mask_base(p, w) - shift * (i64)kv_len;
            sh_mask[1] = (i64)kv_len;
        }
        __syncthreads();
    }
#endif

    for (int pass = row_start; pass < row_end; pass += ROWS) {
        const int nrows = min(ROWS, row_end - pass);
        RowState st;
        i64 lo_all = 0x7fffffffffffffffLL;
        i64 hi_all = -0x7fffffffffffffffLL;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const bool act = r < nrows;
            const int packed = pass + (act ? r : 0);
            const int i = packed / group;
            const int hh = kvh * group + packed % group;
            const i64 qp = (i64)i + shift;
            Raw8 raw;
            if (act && lane < LANES_USED) {
                const char* qb = (const char*)p.q;
                raw_load_ro(raw, qb + (((i64)qo_start + i) * p.q_row + (i64)hh * p.q_head + lane * 8) * FP_ELEM_BYTES);
            } else {
                raw_zero(raw);
            }
            raw_to_f32(raw, st.q[r]);
#if FP_ROPE
            rope8(st.q[r], (int)qp, rope_table, lane);
#endif
            // q stays unscaled: the scale multiplies the reduced score (a scale near the
            // smallest normal would make scaled q subnormal, and the exact fallback needs q).
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                st.acc[r][e] = 0.f;
            }
            i64 hi = p.causal ? qp : (i64)kv_len - 1;
            i64 lo = p.window_left >= 0 ? qp - (i64)p.window_left : 0;
            if (!act) {
                lo = 1;
                hi = 0;
            } else {
                lo_all = lo < lo_all ? lo : lo_all;
                hi_all = hi > hi_all ? hi : hi_all;
            }
            // Token indices are in [0, 2^31): clamping keeps the comparisons exact.
            st.lo[r] = (int)(lo < -1 ? -1 : lo);
            st.hi[r] = (int)(hi < -1 ? -1 : hi);
            st.qpos[r] = (int)qp;
            st.slope[r] = p.alibi ? alibi_slope(hh, hq) : 0.f;
            st.m[r] = FP_NEG_INF;
            st.l[r] = 0.f;
        }
        i64 start = item_lo > lo_all ? (i64)item_lo : lo_all;
        if (start < 0) {
            start = 0;
        }
        i64 end = (i64)item_hi < hi_all + 1 ? (i64)item_hi : hi_all + 1;
        if (end < start) {
            end = start;
        }
        const int nb = (int)((end - start + TILE - 1) / TILE);

        // Software pipeline: page ids two batches ahead, K/V one batch ahead.
        int pid_a[U], pid_b[U];
        KvRaw8 k_a[U], v_a[U], k_b[U], v_b[U];
        fetch_pages(p, 0, start, end, kv_start, tg, pid_a);
        load_kv(p, 0, start, kv_start, kvh, tg, lane, pid_a, k_a, v_a);
        fetch_pages(p, 1, start, end, kv_start, tg, pid_b);
        int b = 0;
        while (b < nb) {
            // Buffer A holds batch b; B's page ids are for batch b + 1.
            load_kv(p, b + 1, start, kv_start, kvh, tg, lane, pid_b, k_b, v_b);
            int pid_c[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                pid_c[u] = pid_a[u];
            }
            fetch_pages(p, b + 2, start, end, kv_start, tg, pid_a);
            compute(p, st, b, start, tg, lane, pid_c, k_a, v_a
#if FP_ROPE
                    , rope_table
#endif
            );
            ++b;
            if (b >= nb) {
                break;
            }
            // Buffer B holds batch b; A's page ids are for batch b + 1.
            load_kv(p, b + 1, start, kv_start, kvh, tg, lane, pid_a, k_a, v_a);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                pid_c[u] = pid_b[u];
            }
            fetch_pages(p, b + 2, start, end, kv_start, tg, pid_b);
            compute(p, st, b, start, tg, lane, pid_c, k_b, v_b
#if FP_ROPE
                    , rope_table
#endif
            );
            ++b;
        }

        // Merge the token groups' states.
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (lane < LANES_USED) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    sh_acc[tg][r][lane * 8 + e] = st.acc[r][e];
                }
            }
            if (lane == 0) {
                sh_m[tg][r] = st.m[r];
                sh_l[tg][r] = st.l[r];
            }
        }
        __syncthreads();
        for (int idx = tid; idx < ROWS * LANES_USED; idx += NT) {
            const int r = idx / LANES_USED;
            const int ln = idx % LANES_USED;
            if (r >= nrows) {
                continue;
            }
            float mx = FP_NEG_INF;
            bool nan = false;
            for (int g = 0; g < NTG; ++g) {
                mx = fmaxf(mx, sh_m[g][r]);
                nan |= sh_l[g][r] != sh_l[g][r];
            }
            float out[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                out[e] = 0.f;
            }
            float sum = 0.f;
            if (!nan && mx != FP_NEG_INF) {
                for (int g = 0; g < NTG; ++g) {
                    const float mg = sh_m[g][r];
                    if (mg == FP_NEG_INF) {
                        continue;
                    }
                    const float wgt = mg == mx ? 1.f : fp_weight(mg, mx);
                    sum += wgt * sh_l[g][r];
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        out[e] = fmaf(wgt, sh_acc[g][r][ln * 8 + e], out[e]);
                    }
                }
            }
            float lse;
            if (nan) {
                // A visible NaN score in some token group: the row is NaN.
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    out[e] = FP_QNAN;
                }
                lse = FP_QNAN;
            } else if (sum > 0.f) {
#if FP_KV_FP8
                // An FP8 cache: v_scale with the normalisation (the outputs of the codes).
                const float inv = fp_kv_scale(p.v_scale, kvh) / sum;
#else
                const float inv = 1.f / sum;
#endif
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    out[e] *= inv;
                }
                lse = mx + logf(sum);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    out[e] = 0.f;
                }
                lse = FP_NEG_INF;
            }
            const int packed = pass + r;
            const int i = packed / group;
            const int hh = kvh * group + packed % group;
            if (partial >= 0) {
                const i64 prow = (i64)partial + i;
                float* po = (float*)p.partial_o;
                store8_f32(po + (prow * hq + hh) * D + ln * 8, out);
                if (ln == 0) {
                    ((float*)p.partial_lse)[prow * hq + hh] = lse;
                }
            } else {
                const i64 row = (i64)qo_start + i;
                const float f = sink_epilogue(p, hh, &lse);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    out[e] *= f;
                }
                char* ob = (char*)p.o;
                store8(ob + (row * p.o_row + (i64)hh * p.o_head + ln * 8) * FP_ELEM_BYTES, out);
                if (ln == 0 && p.lse != 0) {
                    ((float*)p.lse)[row * hq + hh] = lse;
                }
            }
        }
        __syncthreads();  // shared memory is reused by the next pass
    }
}
