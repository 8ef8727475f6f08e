// Device read-bandwidth probe for `flashpage bench`: every thread streams 16-byte vectors
// through a grid-stride loop and folds them into one word per thread, written only when it
// matches an impossible key (so the loads cannot be optimised away and nothing is written).

typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(16) V4b {
    u32 x, y, z, w;
};

extern "C" __global__ void fp_read_bw(const V4b* __restrict__ src, u64 n, u32 key,
                                      u32* __restrict__ sink) {
    u32 acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        V4b a, b, c, d;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w) : "l"(src + i));
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w) : "l"(src + i + stride));
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w) : "l"(src + i + 2 * stride));
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(d.x), "=r"(d.y), "=r"(d.z), "=r"(d.w) : "l"(src + i + 3 * stride));
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
        acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        V4b a;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w) : "l"(src + i));
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == key) {
        sink[0] = acc;
    }
}

// Fills the probe buffer with non-zero pseudo-random words (bandwidth is never measured on
// zeros).
extern "C" __global__ void fp_fill(V4b* __restrict__ dst, u64 n, u32 seed) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        u32 h = (u32)i * 0x9e3779b1u ^ seed ^ (u32)(i >> 32) * 0x85ebca77u;
        h ^= h >> 15;
        h *= 0x2c1b3c6du;
        h ^= h >> 12;
        V4b v;
        v.x = h | 1u;
        v.y = h * 0x27d4eb2fu | 1u;
        v.z = h ^ 0x165667b1u;
        v.w = ~h;
        dst[i] = v;
    }
}
