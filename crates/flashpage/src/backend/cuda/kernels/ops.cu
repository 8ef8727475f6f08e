// The operations around attention: appending new tokens' K/V into the paged cache
// (`fp_append`) and rotating q/k rows in place (`fp_rope`), the device versions of
// src/ops/append.rs and src/ops/rope.rs. Self-contained (no common.cuh, no -D options): the
// element types, head dimension and layout are run-time fields of OpsParams, which mirrors
// `OpsParams` in src/backend/cuda/ops.rs field for field.
//
// One block per token row (grid.x = rows). Rotation: the block's threads take pair index
// i = tid, tid + blockDim, ... < head_dim / 2; each forms its angle pos * freq[i] in double
// (freq: the host's f64 frequencies after scaling, as the CPU op), cos and sin in double
// times mscale rounded to f32, then rotates pair i of every head in f32 without contraction
// (__fmul_rn / __fadd_rn / __fsub_rn), as the CPU op does, and rounds once to the
// destination dtype. Without rotation every element is converted and copied.
//
// FP8 (dtype codes 3 = e4m3fn, 4 = e5m2, as FP_KV_DTYPE of the attention kernels): a code
// is decoded exactly and a value encoded with round-to-nearest-even (e4m3fn saturates to
// +-448, e5m2 overflows to +-inf, NaN to the format's NaN), the rules of src/fp8.rs; a value
// stored into an FP8 cache is divided by its head's scale first (k_scale / v_scale: one
// value per KV head, a per-tensor scale repeated), as the host append does. Rows rotated in
// place (fp_rope) are never scaled.
//
// Every index read from the device arrays is bounds-checked against the sizes in OpsParams
// (the host validated the same arrays); a row whose request, position or page falls outside
// is skipped, never written out of bounds.

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

#define FPO_MAX_PAIRS 128
#define FPO_MAX_SCALES 128

struct OpsParams {
    u64 k_src;          // append: new K rows; rope: the rows rotated in place
    u64 v_src;          // append: new V rows
    u64 k_dst;          // append: K cache (its first element)
    u64 v_dst;          // append: V cache (its first element)
    u64 append_indptr;  // i32 [batch + 1] (CSR mode), or 0
    u64 kv_indptr;      // i32 [batch + 1]
    u64 kv_indices;     // i32 [num_indices]
    u64 kv_last_page_len;  // i32 [batch]
    u64 batch_indices;  // i32 [rows] (per-row mode), or 0
    u64 positions;      // i32 [rows]: per-row mode: the token's position (slot); CSR mode
                        // and rope: the rotation position, or 0 (CSR: position in sequence)
    i64 k_src_row;      // element strides of the source rows
    i64 k_src_head;
    i64 v_src_row;
    i64 v_src_head;
    i64 k_page;         // element strides of the cache
    i64 k_token;
    i64 k_head;
    i64 v_page;
    i64 v_token;
    i64 v_head;
    i64 num_indices;
    int rows;           // token rows (the grid)
    int batch;
    int heads;
    int head_dim;
    int page_size;
    int num_pages;
    int src_dtype;      // 0 = f32, 1 = f16, 2 = bf16, 3 = e4m3fn, 4 = e5m2
    int dst_dtype;
    int rope;           // 1: rotate K (append) / the rows (rope)
    int interleaved;    // 1: pairs (2i, 2i + 1); 0: (i, i + head_dim / 2)
    double mscale;      // cos and sin factor (YaRN), 1 otherwise
    double freq[FPO_MAX_PAIRS];
    float k_scale[FPO_MAX_SCALES];  // append into an FP8 cache: per KV head (1 otherwise)
    float v_scale[FPO_MAX_SCALES];
};

#ifndef FP_HOST_EMULATION
__device__ __forceinline__ float fpo_f16_to_f32(u32 h) {
    float f;
    unsigned short b = (unsigned short)(h & 0xffffu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}
__device__ __forceinline__ u32 fpo_f32_to_f16(float f) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return (u32)b;
}
__device__ __forceinline__ void fpo_sincos(double x, double* s, double* c) { sincos(x, s, c); }
#endif  // FP_HOST_EMULATION (the emulation driver provides these on the host)

__device__ __forceinline__ u32 fpo_f32_to_bf16(float f) {
    // Round to nearest even; NaN stays a quiet NaN (as half::bf16::from_f32).
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u >> 16) | 0x40u;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

// The exact value of an FP8 code (e5m2: 2 mantissa bits, bias 15; e4m3fn: 3, bias 7).
__device__ __forceinline__ float fpo_fp8_to_f32(u32 code, int e5m2) {
    const u32 mb = e5m2 ? 2u : 3u;
    const u32 bias = e5m2 ? 15u : 7u;
    const u32 sign = (code >> 7) << 31;
    const u32 mag = code & 0x7fu;
    const u32 e = mag >> mb, m = mag & ((1u << mb) - 1u);
    const u32 emax = (1u << (7u - mb)) - 1u;
    u32 bits;
    if (e == 0u) {
        // Subnormal or zero: m * 2^(1 - bias - mb), exact in f32.
        bits = __float_as_uint((float)m * __uint_as_float((127u + 1u - bias - mb) << 23));
    } else if (e == emax && e5m2) {
        bits = 0x7f800000u | (m << 21);  // infinity (m = 0) or NaN
    } else if (e == emax && m == (1u << mb) - 1u) {
        bits = 0x7fc00000u;  // e4m3fn's only NaN
    } else {
        bits = ((e + 127u - bias) << 23) | (m << (23u - mb));
    }
    return __uint_as_float(sign | bits);
}

// x rounded to the nearest FP8 code, ties to even (e4m3fn saturates, e5m2 overflows to inf).
__device__ __forceinline__ u32 fpo_f32_to_fp8(float x, int e5m2) {
    const u32 mb = e5m2 ? 2u : 3u;
    const u32 bias = e5m2 ? 15u : 7u;
    const u32 u = __float_as_uint(x);
    const u32 sign = (u >> 31) << 7;
    const u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | (e5m2 ? 0x7eu : 0x7fu);
    }
    const u32 max_code = e5m2 ? 0x7cu : 0x7eu;
    u32 code;
    if (a < ((128u - bias) << 23)) {
        // Below the smallest normal: a / quantum is exact and rounds to the code itself.
        const float q = __uint_as_float((127u + bias + mb - 1u) << 23);
        code = (u32)rintf(__uint_as_float(a) * q);
    } else {
        // Drop 23 - mb mantissa bits, nearest even (a carry moves into the exponent).
        const u32 shift = 23u - mb;
        const u32 r = (a + ((1u << (shift - 1u)) - 1u) + ((a >> shift) & 1u)) >> shift;
        code = r - ((127u - bias) << mb);
        code = code < max_code ? code : max_code;
    }
    return sign | code;
}

__device__ __forceinline__ float fpo_load(const char* base, i64 idx, int dtype) {
    if (dtype == 0) {
        return ((const float*)base)[idx];
    }
    if (dtype >= 3) {
        return fpo_fp8_to_f32(((const unsigned char*)base)[idx], dtype == 4);
    }
    const u32 b = ((const u16*)base)[idx];
    return dtype == 1 ? fpo_f16_to_f32(b) : __uint_as_float(b << 16);
}

__device__ __forceinline__ void fpo_store(char* base, i64 idx, int dtype, float x) {
    if (dtype == 0) {
        ((float*)base)[idx] = x;
    } else if (dtype >= 3) {
        ((unsigned char*)base)[idx] = (unsigned char)fpo_f32_to_fp8(x, dtype == 4);
    } else {
        ((u16*)base)[idx] = (u16)(dtype == 1 ? fpo_f32_to_f16(x) : fpo_f32_to_bf16(x));
    }
}

// Rotates (or copies, rope == 0) the `heads` heads of one row from src (element offset
// `s0`, head stride `sh`, dtype `sdt`) to dst (`d0`, `dh`, `ddt`) at position `pos`; with
// `scale` (an FP8 cache), head h's values are divided by scale[h] before they are stored.
__device__ __forceinline__ void fpo_row(const OpsParams& p, const char* src, i64 s0, i64 sh,
                                        int sdt, char* dst, i64 d0, i64 dh, int ddt, int rope,
                                        i64 pos, const float* scale) {
    const int d = p.head_dim;
    if (!rope) {
        for (int e = threadIdx.x; e < p.heads * d; e += blockDim.x) {
            const int h = e / d, j = e % d;
            float x = fpo_load(src, s0 + h * sh + j, sdt);
            if (scale) {
                x = __fdiv_rn(x, scale[h]);
            }
            fpo_store(dst, d0 + h * dh + j, ddt, x);
        }
        return;
    }
    const int half = d / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double sn, cs;
        fpo_sincos((double)pos * p.freq[i], &sn, &cs);
        const float c = (float)(cs * p.mscale);
        const float s = (float)(sn * p.mscale);
        const int ia = p.interleaved ? 2 * i : i;
        const int ib = p.interleaved ? 2 * i + 1 : i + half;
        for (int h = 0; h < p.heads; ++h) {
            const float a = fpo_load(src, s0 + h * sh + ia, sdt);
            const float b = fpo_load(src, s0 + h * sh + ib, sdt);
            float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
            float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
            if (scale) {
                ra = __fdiv_rn(ra, scale[h]);
                rb = __fdiv_rn(rb, scale[h]);
            }
            fpo_store(dst, d0 + h * dh + ia, ddt, ra);
            fpo_store(dst, d0 + h * dh + ib, ddt, rb);
        }
    }
}

extern "C" __global__ void fp_append(const __grid_constant__ OpsParams p) {
    const int t = blockIdx.x;
    if (t >= p.rows) {
        return;
    }
    const int* kv_indptr = (const int*)p.kv_indptr;
    const int* last = (const int*)p.kv_last_page_len;
    const int* pos_arr = (const int*)p.positions;
    int r;
    int off = -1;  // CSR mode: the row's index within its request's append
    int n = 0;     // CSR mode: rows the request appends
    if (p.batch_indices != 0) {
        // Per-row mode (FlashInfer's batch_indices / positions).
        r = ((const int*)p.batch_indices)[t];
        if (r < 0 || r >= p.batch) {
            return;
        }
    } else {
        // CSR mode: the request whose append rows hold t (the last r with indptr[r] <= t).
        const int* ai = (const int*)p.append_indptr;
        int lo = 0, hi = p.batch;
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (ai[mid] <= t) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        r = lo;
        if (t < ai[r] || t >= ai[r + 1]) {
            return;
        }
        off = t - ai[r];
        n = ai[r + 1] - ai[r];
    }
    const int pages = kv_indptr[r + 1] - kv_indptr[r];
    const i64 kv_len = pages > 0 ? (i64)(pages - 1) * p.page_size + last[r] : 0;
    const i64 pos = off >= 0 ? kv_len - n + off : (i64)pos_arr[t];
    if (pos < 0 || pos >= kv_len) {
        return;
    }
    const i64 at = (i64)kv_indptr[r] + pos / p.page_size;
    if (at < 0 || at >= p.num_indices) {
        return;
    }
    const int page = ((const int*)p.kv_indices)[at];
    if (page < 0 || page >= p.num_pages) {
        return;
    }
    const i64 slot = pos % p.page_size;
    const i64 rpos = (p.batch_indices == 0 && pos_arr != 0) ? (i64)pos_arr[t] : pos;
    const bool fp8 = p.dst_dtype >= 3;
    fpo_row(p, (const char*)p.k_src, (i64)t * p.k_src_row, p.k_src_head, p.src_dtype,
            (char*)p.k_dst, (i64)page * p.k_page + slot * p.k_token, p.k_head, p.dst_dtype,
            p.rope, rpos, fp8 ? p.k_scale : nullptr);
    fpo_row(p, (const char*)p.v_src, (i64)t * p.v_src_row, p.v_src_head, p.src_dtype,
            (char*)p.v_dst, (i64)page * p.v_page + slot * p.v_token, p.v_head, p.dst_dtype, 0,
            0, fp8 ? p.v_scale : nullptr);
}

extern "C" __global__ void fp_rope(const __grid_constant__ OpsParams p) {
    const int t = blockIdx.x;
    if (t >= p.rows) {
        return;
    }
    const int pos = ((const int*)p.positions)[t];
    if (pos < 0) {
        return;
    }
    // In place: each pair is read by the thread that writes it, before it writes it.
    char* x = (char*)p.k_src;
    fpo_row(p, x, (i64)t * p.k_src_row, p.k_src_head, p.src_dtype, x,
            (i64)t * p.k_src_row, p.k_src_head, p.src_dtype, 1, pos, nullptr);
}
