// Shared prelude of flashpage's CUDA kernels. Header-free on purpose: NVRTC compiles it with
// no include path. 16-bit floats are carried as raw bits and converted with PTX `cvt`.
//
// Compile-time configuration (NVRTC -D options, set by the Rust side):
//   FP_HEAD_DIM  head dimension (a multiple of 16, at most 256)
//   FP_DTYPE     0 = f32, 1 = f16, 2 = bf16 (q and o; k and v too without FP_KV_DTYPE)
//   FP_KV_DTYPE  element type of the K/V cache: FP_DTYPE (the default), or an FP8 cache:
//                3 = e4m3fn, 4 = e5m2 (bytes decoded exactly to f32 in registers, the
//                dequantisation scales applied in f32 to scores and outputs)
//
// Helpers are `__device__ __forceinline__` without `static`: each kernel uses a subset, and
// NVRTC warns (#177) about unused static functions; the warning-free log is checked in CI.

#if defined(FP_DTYPE) && FP_DTYPE > 2
#error "FP_DTYPE is q's and o's dtype (0, 1 or 2); an fp8 k/v cache is FP_KV_DTYPE 3 or 4"
#endif
#if defined(FP_DTYPE) && !defined(FP_KV_DTYPE)
#define FP_KV_DTYPE FP_DTYPE
#endif
#if defined(FP_KV_DTYPE) && FP_KV_DTYPE != FP_DTYPE && FP_KV_DTYPE != 3 && FP_KV_DTYPE != 4
#error "FP_KV_DTYPE must be FP_DTYPE or an fp8 code (3 = e4m3fn, 4 = e5m2)"
#endif
#if defined(FP_KV_DTYPE) && FP_KV_DTYPE >= 3
#define FP_KV_FP8 1
#else
#define FP_KV_FP8 0
#endif
// Slots of the per-KV-head FP8 scales in the parameter block (FP_SCALE_SLOTS in launch.rs).
#define FP_SCALE_SLOTS 128

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

#define FP_INF __int_as_float(0x7f800000)
#define FP_NEG_INF __int_as_float((int)0xff800000u)
#define FP_LOG2E 1.4426950408889634f
#define FP_LN2 0.6931471805599453f
#define FP_FULL_MASK 0xffffffffu
#define FP_QNAN __int_as_float(0x7fc00000)
#define FP_FLT_MAX 3.4028234663852886e38f

// Finite (not ±inf, not NaN), by the exponent bits: the same on the device and the host.
__device__ __forceinline__ bool fp_finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Kernel parameters: must match `Params` in src/backend/cuda/launch.rs field for field.
struct Params {
    u64 q;            // [rows, hq, D] elements of the dtype (strided: q_row, q_head)
    u64 k;            // K cache (strided)
    u64 v;            // V cache (strided)
    u64 o;            // [rows, hq, D] (strided: o_row, o_head)
    u64 lse;          // [rows, hq] f32, or 0
    u64 kv_indices;   // page ids (paged), i32
    u64 int_ws;       // the plan's int image
    u64 partial_o;    // [partial rows, hq, D] f32
    u64 partial_lse;  // [partial rows, hq] f32
    i64 stride_page;  // K strides, elements
    i64 stride_token;
    i64 stride_head;
    i64 v_stride_page;  // V strides, elements
    i64 v_stride_token;
    i64 v_stride_head;
    i64 q_row;        // q strides (row, head), elements
    i64 q_head;
    i64 o_row;        // o strides (row, head), elements
    i64 o_head;
    i64 qo_rows;      // rows available in q, o and lse (bound of every row index)
    i64 num_indices;  // entries of kv_indices
    i64 partial_cap;  // partial rows the float workspace holds
    int num_pages;    // pages in the cache (ragged: tokens)
    int page_size;
    u32 ps_magic;     // page_size division: t / ps = (umulhi(t, magic) + t) >> shift
    int ps_shift;
    int num_qo_heads;
    int group;        // num_qo_heads / num_kv_heads
    int req_cap;      // capacities of the plan's arrays (the launch shape)
    int work_cap;
    int merge_cap;
    int req_off;      // offsets of the arrays in the int image, in i32 words
    int work_off;
    int merge_off;
    int paged;        // 1: paged cache, 0: ragged K/V
    int causal;
    int window_left;  // -1: none
    int alibi;
    int has_soft_cap;
    float soft_cap;
    float sm_scale;
    float rope_theta;
    float rope_scale;
    int pad_;
    u64 sinks;        // [hq] f32 sink logits (natural log), or 0
    u64 mask;         // custom mask bits (FlashInfer's packed layout, u8), or 0
    u64 mask_indptr;  // [B + 1] i32 byte offsets of each request's mask bits
    i64 mask_bytes;   // bytes of the mask bits buffer (a bit past it reads as masked)
    // FP8 cache dequantisation scales by KV head (a per-tensor scale fills every slot; KV
    // heads past the slots use slot 0, which the host allows only for a per-tensor scale).
    // 1 for a float cache (unread there).
    float k_scale[FP_SCALE_SLOTS];
    float v_scale[FP_SCALE_SLOTS];
};

// The K or V scale of KV head `kvh` (see Params).
__device__ __forceinline__ float fp_kv_scale(const float* scales, int kvh) {
    return scales[kvh < FP_SCALE_SLOTS ? kvh : 0];
}

struct alignas(16) V4 {
    u32 x, y, z, w;
};

#ifndef FP_HOST_EMULATION
// 16-byte read-only load that does not allocate in L1 (K/V are streamed once).
__device__ __forceinline__ V4 ld_stream(const void* p) {
    V4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// 8-byte read-only load that does not allocate in L1 (FP8 K/V: 8 elements).
__device__ __forceinline__ void ld_stream8(const void* p, u32* x, u32* y) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(*x), "=r"(*y) : "l"(p));
}

// 16-byte read-only load (q, partial states).
__device__ __forceinline__ V4 ld_ro(const void* p) {
    V4 r;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ void st16(void* p, V4 v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float f16_bits_to_f32(u32 h) {
    float f;
    unsigned short b = (unsigned short)(h & 0xffffu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}

__device__ __forceinline__ u32 f32_to_f16_bits(float f) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return (u32)b;
}

__device__ __forceinline__ u32 f32_to_bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return (u32)b;
#else
    // Round to nearest even by hand (no cvt.rn.bf16 before sm_80); NaN stays NaN.
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fc0u;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
#endif
}
#endif  // FP_HOST_EMULATION (host_emulation.cpp provides these on the host)

// Online-softmax weight of score x (natural units) under running max mx: the limit when
// mx is +inf (logits past the f32 range: the +inf scores share the weight equally).
__device__ __forceinline__ float fp_weight(float x, float mx) {
    if (mx == FP_INF) {
        return x == FP_INF ? 1.f : 0.f;
    }
    return ex2((x - mx) * FP_LOG2E);
}

// Eight f32 values stored as two 16-byte stores / loaded as two 16-byte loads.
__device__ __forceinline__ void store8_f32(float* p, const float* f) {
    V4 a, b;
    a.x = __float_as_uint(f[0]);
    a.y = __float_as_uint(f[1]);
    a.z = __float_as_uint(f[2]);
    a.w = __float_as_uint(f[3]);
    b.x = __float_as_uint(f[4]);
    b.y = __float_as_uint(f[5]);
    b.z = __float_as_uint(f[6]);
    b.w = __float_as_uint(f[7]);
    st16(p, a);
    st16(p + 4, b);
}

__device__ __forceinline__ void load8_f32(const float* p, float* f) {
    V4 a = ld_ro(p);
    V4 b = ld_ro(p + 4);
    f[0] = __uint_as_float(a.x);
    f[1] = __uint_as_float(a.y);
    f[2] = __uint_as_float(a.z);
    f[3] = __uint_as_float(a.w);
    f[4] = __uint_as_float(b.x);
    f[5] = __uint_as_float(b.y);
    f[6] = __uint_as_float(b.z);
    f[7] = __uint_as_float(b.w);
}

// Eight elements of the storage dtype: the unit every thread loads, converts and stores.
#if FP_DTYPE == 0
#define FP_ELEM_BYTES 4
struct Raw8 {
    V4 a, b;
};
__device__ __forceinline__ void raw_zero(Raw8& r) {
    r.a.x = r.a.y = r.a.z = r.a.w = 0u;
    r.b.x = r.b.y = r.b.z = r.b.w = 0u;
}
__device__ __forceinline__ void raw_load_stream(Raw8& r, const char* p) {
    r.a = ld_stream(p);
    r.b = ld_stream(p + 16);
}
__device__ __forceinline__ void raw_load_ro(Raw8& r, const char* p) {
    r.a = ld_ro(p);
    r.b = ld_ro(p + 16);
}
__device__ __forceinline__ void raw_to_f32(const Raw8& r, float* f) {
    f[0] = __uint_as_float(r.a.x);
    f[1] = __uint_as_float(r.a.y);
    f[2] = __uint_as_float(r.a.z);
    f[3] = __uint_as_float(r.a.w);
    f[4] = __uint_as_float(r.b.x);
    f[5] = __uint_as_float(r.b.y);
    f[6] = __uint_as_float(r.b.z);
    f[7] = __uint_as_float(r.b.w);
}
__device__ __forceinline__ void store8(char* p, const float* f) {
    store8_f32(reinterpret_cast<float*>(p), f);
}
#else
#define FP_ELEM_BYTES 2
struct Raw8 {
    V4 a;
};
__device__ __forceinline__ void raw_zero(Raw8& r) {
    r.a.x = r.a.y = r.a.z = r.a.w = 0u;
}
__device__ __forceinline__ void raw_load_stream(Raw8& r, const char* p) {
    r.a = ld_stream(p);
}
__device__ __forceinline__ void raw_load_ro(Raw8& r, const char* p) {
    r.a = ld_ro(p);
}
#if FP_DTYPE == 1
__device__ __forceinline__ void pair_to_f32(u32 w, float* f) {
    f[0] = f16_bits_to_f32(w);
    f[1] = f16_bits_to_f32(w >> 16);
}
__device__ __forceinline__ u32 f32_to_pair(float lo, float hi) {
    return f32_to_f16_bits(lo) | (f32_to_f16_bits(hi) << 16);
}
#else
__device__ __forceinline__ void pair_to_f32(u32 w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ u32 f32_to_pair(float lo, float hi) {
    return f32_to_bf16_bits(lo) | (f32_to_bf16_bits(hi) << 16);
}
#endif
__device__ __forceinline__ void raw_to_f32(const Raw8& r, float* f) {
    pair_to_f32(r.a.x, f);
    pair_to_f32(r.a.y, f + 2);
    pair_to_f32(r.a.z, f + 4);
    pair_to_f32(r.a.w, f + 6);
}
__device__ __forceinline__ void store8(char* p, const float* f) {
    V4 a;
    a.x = f32_to_pair(f[0], f[1]);
    a.y = f32_to_pair(f[2], f[3]);
    a.z = f32_to_pair(f[4], f[5]);
    a.w = f32_to_pair(f[6], f[7]);
    st16(p, a);
}
#endif

// FP8 codes decoded exactly to f32 (crates/flashpage/src/fp8.rs, bit manipulation only):
// e4m3fn's S.1111.111 is NaN (it has no infinity); e5m2 is the top byte of an f16, so its
// S.11111.00 is +-inf and S.11111.{01,10,11} NaN, subnormals included.
#if FP_KV_FP8
__device__ __forceinline__ float fp8_to_f32(u32 code) {
    code &= 0xffu;
#if FP_KV_DTYPE == 4
    return f16_bits_to_f32(code << 8);
#else
    const u32 sign = (code & 0x80u) << 24;
    const u32 mag = code & 0x7fu;
    u32 bits;
    if (mag == 0x7fu) {
        bits = 0x7fc00000u;  // NaN
    } else if (mag < 8u) {
        // Subnormal or zero: m * 2^-9, exact.
        bits = __float_as_uint((float)mag * 0.001953125f);
    } else {
        // Normal: rebias the exponent (7 -> 127), widen the mantissa (3 -> 23 bits).
        bits = (mag << 20) + (120u << 23);
    }
    return __uint_as_float(sign | bits);
#endif
}
#endif

// Eight K/V elements as loaded: the storage dtype's Raw8, or 8 FP8 bytes in two words.
#if FP_KV_FP8
#define FP_KV_BYTES 1
struct KvRaw8 {
    u32 x, y;
};
__device__ __forceinline__ void kv_zero(KvRaw8& r) {
    r.x = r.y = 0u;
}
__device__ __forceinline__ void kv_load_stream(KvRaw8& r, const char* p) {
    ld_stream8(p, &r.x, &r.y);
}
__device__ __forceinline__ void kv_to_f32(const KvRaw8& r, float* f) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[e] = fp8_to_f32(r.x >> (8 * e));
        f[4 + e] = fp8_to_f32(r.y >> (8 * e));
    }
}
#else
#define FP_KV_BYTES FP_ELEM_BYTES
typedef Raw8 KvRaw8;
__device__ __forceinline__ void kv_zero(KvRaw8& r) {
    raw_zero(r);
}
__device__ __forceinline__ void kv_load_stream(KvRaw8& r, const char* p) {
    raw_load_stream(r, p);
}
__device__ __forceinline__ void kv_to_f32(const KvRaw8& r, float* f) {
    raw_to_f32(r, f);
}
#endif

// t / page_size with the plan's magic numbers (t < 2^31, so umulhi(t, magic) + t does not
// overflow 32 bits).
__device__ __forceinline__ int fp_div_ps(const Params& p, int t) {
    const u32 hi = __umulhi((u32)t, p.ps_magic);
    return (int)((hi + (u32)t) >> p.ps_shift);
}

// One work item of the plan's int image (docs/cuda.md) with its request's ranges.
struct WorkItem {
    int row_start, row_end;  // packed rows (row * group + head offset) of the request
    int item_lo, item_hi;    // key range
    int partial;             // first partial row in the float workspace, or -1
    int qo_start, qo_len, kv_start, kv_len;
};

// Reads work item w. False for a padded item (graph mode) and for one whose ranges fall
// outside the buffers the parameters describe (a valid plan always passes): the kernels'
// bounds, checked once per item.
__device__ __forceinline__ bool fp_work_item(const Params& p, int w, WorkItem& it) {
    const int* ws = (const int*)p.int_ws;
    const int* wi = ws + p.work_off;
    const int wc = p.work_cap;
    const int req = wi[w];
    if (req < 0 || req >= p.req_cap) {
        return false;  // padded item (graph mode)
    }
    it.row_start = wi[wc + w];
    it.row_end = wi[2 * wc + w];
    it.item_lo = wi[3 * wc + w];
    it.item_hi = wi[4 * wc + w];
    it.partial = wi[5 * wc + w];
    const int* rq = ws + p.req_off;
    const int rc = p.req_cap;
    it.qo_start = rq[req];
    it.qo_len = rq[rc + req];
    it.kv_start = rq[2 * rc + req];
    it.kv_len = rq[3 * rc + req];

    // Bounds of everything this item touches (a valid plan always passes).
    if (it.qo_start < 0 || it.qo_len < 0 || it.kv_start < 0 || it.kv_len < 0 ||
        it.row_start < 0 || it.row_start >= it.row_end ||
        (i64)it.row_end > (i64)it.qo_len * p.group || it.item_lo < 0 || it.item_hi > it.kv_len ||
        (i64)it.qo_start + it.qo_len > p.qo_rows) {
        return false;
    }
    if (p.paged) {
        if (it.kv_len > 0 &&
            (i64)it.kv_start + fp_div_ps(p, it.kv_len - 1) + 1 > p.num_indices) {
            return false;
        }
    } else if ((i64)it.kv_start + it.kv_len > (i64)p.num_pages) {
        return false;
    }
    if (it.partial >= 0 && (i64)it.partial + it.qo_len > p.partial_cap) {
        return false;
    }
    return true;
}

// The bit offset of work item w's request in the custom mask (docs/semantics.md, "Custom
// masks"): 8 * mask_indptr[request]; -1 without a mask. Query row i sees key t only where bit
// base + i * kv_len + t is set (`fp_mask_visible`). The run's arguments were checked against
// the plan on the host: every bit of every request is inside the buffer.
__device__ __forceinline__ i64 fp_mask_base(const Params& p, int w) {
    if (p.mask == 0) {
        return -1;
    }
    const int* ws = (const int*)p.int_ws;
    const int req = ws[p.work_off + w];
    return (i64)((const int*)p.mask_indptr)[req] * 8;
}

// Whether bit `bit` of the custom mask is set (least significant bit first in each byte). A
// bit outside the buffer (a device mask_indptr that disagrees with its checked host copy)
// reads as masked, so no argument can make the kernels read out of bounds.
__device__ __forceinline__ bool fp_mask_visible(const Params& p, i64 bit) {
    if (bit < 0 || (bit >> 3) >= p.mask_bytes) {
        return false;
    }
    return (((const unsigned char*)p.mask)[bit >> 3] >> (bit & 7)) & 1;
}

// Attention-sink epilogue on a finished state (docs/semantics.md, "Attention sinks"): with
// the sink logit s of query head h, lse' = ln(e^lse + e^s) and the returned factor
// e^(lse - lse') scales the normalised output row. Relative to the larger of the two, so an
// empty state (lse = -inf) gives 0 and lse' = s, and a sink of -inf (or no sinks) gives 1.
__device__ __forceinline__ float sink_epilogue(const Params& p, int h, float* lse) {
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
