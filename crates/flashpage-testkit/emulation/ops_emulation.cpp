// Host emulation of the append and RoPE kernels (kernels/ops.cu), for testing their logic
// without a GPU. The kernels use no shared memory, barrier or shuffle, so every CUDA thread
// of every block runs one after another on one host thread (blockIdx / threadIdx set for
// each). The PTX f16 conversions are replaced by round-to-nearest host conversions
// (_Float16), the f32 intrinsics that forbid contraction by plain operations (built with
// -ffp-contract=off), sincos by the host's double sin and cos.
//
// Usage: ops_emulation <entry> <input> <output>, entry `append` or `rope`. Input (little
// endian): the OpsParams bytes, whose pointer fields hold element-0 byte offsets into their
// buffers; then 10 buffers in pointer-field order (k_src, v_src, k_dst, v_dst,
// append_indptr, kv_indptr, kv_indices, kv_last_page_len, batch_indices, positions), each a
// u64 byte length and the bytes. A pointer whose buffer is empty becomes 0 (absent), except
// v_dst, which then points into k_dst's buffer (a combined cache). Output: the bytes of
// buffers 0..4 (k_src, v_src, k_dst, v_dst) after the launch.
//
// Built by crates/flashpage-testkit/src/emulate.rs.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
#define FP_HOST_EMULATION 1

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static Dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef unsigned int u32;

static inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline void fpo_sincos(double x, double* s, double* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
static inline float fpo_f16_to_f32(u32 h) {
    const unsigned short b = (unsigned short)(h & 0xffffu);
    _Float16 f;
    std::memcpy(&f, &b, 2);
    return (float)f;
}
static inline u32 fpo_f32_to_f16(float f) {
    const _Float16 h = (_Float16)f;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}

#include "ops.cu"

static bool read_exact(FILE* f, void* p, size_t n) { return std::fread(p, 1, n, f) == n; }

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: ops_emulation append|rope <input> <output>\n");
        return 2;
    }
    const bool append = std::strcmp(argv[1], "append") == 0;
    if (!append && std::strcmp(argv[1], "rope") != 0) {
        return 2;
    }
    FILE* in = std::fopen(argv[2], "rb");
    if (!in) {
        return 2;
    }
    OpsParams p;
    static_assert(sizeof(OpsParams) == 2264, "OpsParams layout");
    if (!read_exact(in, &p, sizeof p)) {
        return 3;
    }
    std::vector<std::vector<unsigned char>> bufs(10);
    for (auto& b : bufs) {
        unsigned long long n = 0;
        if (!read_exact(in, &n, 8)) {
            return 3;
        }
        // 16 spare zero bytes after each buffer: a write past the end is caught below.
        b.assign(n + 16, 0);
        if (n && !read_exact(in, b.data(), n)) {
            return 3;
        }
    }
    std::fclose(in);
    u64* fields[10] = {&p.k_src,     &p.v_src,      &p.k_dst,
                       &p.v_dst,     &p.append_indptr, &p.kv_indptr,
                       &p.kv_indices, &p.kv_last_page_len, &p.batch_indices,
                       &p.positions};
    for (int i = 0; i < 10; ++i) {
        const bool empty = bufs[i].size() == 16;
        if (i == 3 && empty) {
            *fields[i] += (u64)(uintptr_t)bufs[2].data();
        } else if (empty) {
            *fields[i] = 0;
        } else {
            *fields[i] += (u64)(uintptr_t)bufs[i].data();
        }
    }
    gridDim = Dim3{(unsigned)p.rows, 1, 1};
    blockDim = Dim3{64, 1, 1};
    for (unsigned b = 0; b < gridDim.x; ++b) {
        for (unsigned t = 0; t < blockDim.x; ++t) {
            blockIdx = Dim3{b, 0, 0};
            threadIdx = Dim3{t, 0, 0};
            if (append) {
                fp_append(p);
            } else {
                fp_rope(p);
            }
        }
    }
    for (auto& b : bufs) {
        for (size_t j = b.size() - 16; j < b.size(); ++j) {
            if (b[j] != 0) {
                std::fprintf(stderr, "a buffer was written past its end\n");
                return 5;
            }
        }
    }
    FILE* out = std::fopen(argv[3], "wb");
    if (!out) {
        return 4;
    }
    for (int i = 0; i < 4; ++i) {
        std::fwrite(bufs[i].data(), 1, bufs[i].size() - 16, out);
    }
    std::fclose(out);
    return 0;
}
