// Host emulation of the CUDA kernels, for testing their logic without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on one host thread, switched only at
// barriers; __syncthreads is a block barrier and the warp shuffles exchange values through
// a per-warp buffer between two warp barriers, so a kernel whose lanes do not reach a
// shuffle together is found (a scheduler round in which no fiber gets further: the
// emulator exits with status 6) instead of silently computing garbage. Blocks run one after
// another, so `__shared__` arrays (static locals here) are per block as on the device.
// Fibers instead of one OS thread per CUDA thread: a block of 128 threads then costs no
// kernel context switches at its barriers (with OS threads, 128 threads spinning on
// barriers on a small machine made the emulated suite take an hour). The
// PTX helpers of common.cuh are replaced by host equivalents (16-byte memcpy loads and
// stores, exp2f, round-to-nearest f16/bf16 conversions), and the warp vote `__any_sync`
// goes through the same buffer as the shuffles.
//
// Usage: host_emulation <input> <output>. Input (little endian): the Params bytes with the
// pointer fields ignored (the mask pointer is 1 when the run has a custom mask); then 11
// buffers (q, k, v, kv_indices, int_ws, float_ws, o, lse, sinks: empty for none, the custom
// mask's bits and its mask_indptr),
// each a u64 byte length followed by the bytes; then u32 work_cap, num_kv_heads, merge_cap,
// launch_merge. Output: the bytes of o, then of lse.
//
// Cascade mode: host_emulation --cascade <input> <output>. Input: 8 buffers (q, k, v, o,
// lse, sinks, int_ws, float_ws: u64 length, bytes) whose device addresses are relocated:
// every pointer field of the parameter blocks is `(buffer index + 1) << 40 | byte offset`
// (0: none), as the backend's launch description computes them over those fake bases; then
// u32 levels, per level the Params bytes and u32 work_cap, num_kv_heads, merge_cap,
// launch_merge; then the FoldParams bytes and u32 fold rows. The levels' kernels and the
// fold run in that order. Output: o, then lse.
//
// Built by the test in src/backend/cuda/emulate.rs with the same -D options as NVRTC gets.

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
// Set by the scheduler before it resumes a fiber (fibers switch only at barriers).
static Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;

static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
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
static inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
static inline int __ldg(const int* p) { return *p; }
static inline int min(int a, int b) { return a < b ? a : b; }
using std::exp2;
using std::floor;
using std::pow;
// sin(pi x) and cos(pi x), as CUDA's sincospif (within 1 ulp there: here through double).
static inline void sincospif(float x, float* s, float* c) {
    const double a = 3.141592653589793 * (double)x;
    *s = (float)std::sin(a);
    *c = (float)std::cos(a);
}

// Fibers and their scheduler.
struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    bool done = false;
};
static constexpr size_t kFiberStack = 128 * 1024;
static ucontext_t g_main;
static Fiber* g_cur = nullptr;
static unsigned long long g_progress = 0;  // barrier arrivals and finished fibers
static std::function<void()> g_kernel;

static void fiber_main() {
    g_kernel();
    g_cur->done = true;
    ++g_progress;
}

// A barrier for `count` fibers: the last to arrive releases the others.
struct FBarrier {
    unsigned count = 0, arrived = 0, gen = 0;
    void arrive_and_wait() {
        const unsigned g = gen;
        ++g_progress;
        if (++arrived == count) {
            arrived = 0;
            ++gen;
            return;
        }
        while (gen == g) {
            swapcontext(&g_cur->ctx, &g_main);
        }
    }
};

// Warp and block synchronisation.
struct BlockSync {
    FBarrier block;
    std::vector<FBarrier> warp;
    std::vector<double> buf;
};
static BlockSync* g_sync = nullptr;

static inline void __syncthreads() { g_sync->block.arrive_and_wait(); }

// Values travel as double (exact for float): one buffer serves float and double shuffles.
template <class T>
static inline T shfl_from(T x, int src_lane) {
    const int w = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    g_sync->buf[w * 32 + lane] = (double)x;
    g_sync->warp[w].arrive_and_wait();
    const T r = (T)g_sync->buf[w * 32 + src_lane];
    g_sync->warp[w].arrive_and_wait();
    return r;
}
template <class T>
static inline T __shfl_xor_sync(unsigned, T x, int mask, int width = 32) {
    const int lane = threadIdx.x % 32;
    int src = lane ^ mask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) {
        src = lane;
    }
    return shfl_from(x, src);
}
static inline float __shfl_sync(unsigned, float x, int src, int width = 32) {
    const int lane = threadIdx.x % 32;
    return shfl_from(x, (lane & ~(width - 1)) + (src % width));
}
// Warp vote: every lane must arrive (as on the device with the full mask).
static inline bool __any_sync(unsigned, bool pred) {
    const int w = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    g_sync->buf[w * 32 + lane] = pred ? 1.0 : 0.0;
    g_sync->warp[w].arrive_and_wait();
    bool any = false;
    for (int i = 0; i < 32; ++i) {
        any |= g_sync->buf[w * 32 + i] != 0.0;
    }
    g_sync->warp[w].arrive_and_wait();
    return any;
}

typedef unsigned int u32;

// Declared here, defined below once common.cuh has defined V4.
struct V4;
static inline V4 ld_stream(const void* p);
static inline V4 ld_ro(const void* p);
static inline void ld_stream8(const void* p, u32* x, u32* y);
static inline void st16(void* p, V4 v);
static inline float ex2(float x);
static inline float f16_bits_to_f32(u32 h);
static inline u32 f32_to_f16_bits(float f);
static inline u32 f32_to_bf16_bits(float f);

#include "common.cuh"

// Host versions of the PTX helpers.
static inline V4 ld_stream(const void* p) {
    V4 r;
    std::memcpy(&r, p, 16);
    return r;
}
static inline V4 ld_ro(const void* p) { return ld_stream(p); }
static inline void ld_stream8(const void* p, u32* x, u32* y) {
    std::memcpy(x, p, 4);
    std::memcpy(y, (const char*)p + 4, 4);
}
static inline void st16(void* p, V4 v) { std::memcpy(p, &v, 16); }
static inline float ex2(float x) { return std::exp2(x); }
static inline float f16_bits_to_f32(u32 h) {
    const unsigned short b = (unsigned short)(h & 0xffffu);
    _Float16 f;
    std::memcpy(&f, &b, 2);
    return (float)f;
}
static inline u32 f32_to_f16_bits(float f) {
    const _Float16 h = (_Float16)f;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}
static inline u32 f32_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fc0u;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

#if FP_PREFILL
// The tensor-core prefill kernel (its variants are built with -DFP_PREFILL=1).
#include "tensor_core_emulation.hpp"
#include "prefill.cu"
#else
#include "decode.cu"
#endif
#include "merge.cu"

static bool read_exact(FILE* f, void* p, size_t n) { return std::fread(p, 1, n, f) == n; }

// Runs the grid block by block; within a block, the fibers round-robin until all finish.
template <class F>
static void launch(unsigned gx, unsigned gy, unsigned threads, F kernel) {
    gridDim = Dim3{gx, gy, 1};
    blockDim = Dim3{threads, 1, 1};
    BlockSync sync;
    sync.block.count = threads;
    sync.warp.assign(threads / 32, FBarrier{32, 0, 0});
    sync.buf.assign(threads, 0.0);
    g_sync = &sync;
    g_kernel = kernel;
    std::vector<Fiber> fibers(threads);
    for (auto& f : fibers) {
        f.stack.reset(new char[kFiberStack]);
    }
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            blockIdx = Dim3{bx, by, 0};
            for (auto& f : fibers) {
                f.done = false;
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.get();
                f.ctx.uc_stack.ss_size = kFiberStack;
                f.ctx.uc_link = &g_main;
                makecontext(&f.ctx, fiber_main, 0);
            }
            unsigned live = threads;
            while (live > 0) {
                const unsigned long long before = g_progress;
                for (unsigned t = 0; t < threads; ++t) {
                    if (fibers[t].done) {
                        continue;
                    }
                    g_cur = &fibers[t];
                    threadIdx = Dim3{t, 0, 0};
                    swapcontext(&g_main, &fibers[t].ctx);
                    if (fibers[t].done) {
                        --live;
                    }
                }
                if (live > 0 && g_progress == before) {
                    std::fprintf(stderr,
                                 "block (%u, %u): lanes wait at a barrier or shuffle that "
                                 "others never reach\n",
                                 bx, by);
                    std::exit(6);
                }
            }
        }
    }
    g_cur = nullptr;
    g_sync = nullptr;
}

// Cascade mode (see the header): the launch sequence of a cascade over relocated buffers.
static int run_cascade(const char* in_path, const char* out_path) {
    FILE* in = std::fopen(in_path, "rb");
    if (!in) {
        return 2;
    }
    std::vector<std::vector<unsigned char>> bufs(8);
    for (auto& b : bufs) {
        unsigned long long n = 0;
        if (!read_exact(in, &n, 8)) {
            return 3;
        }
        b.assign(n + 16, 0);
        if (n && !read_exact(in, b.data(), n)) {
            return 3;
        }
    }
    bool bad = false;
    auto reloc = [&](u64& p) {
        if (p == 0) {
            return;
        }
        const u64 i = (p >> 40) - 1, off = p & ((1ull << 40) - 1);
        if (i >= bufs.size() || off > bufs[i].size() - 16) {
            bad = true;
            return;
        }
        p = (u64)(uintptr_t)bufs[i].data() + off;
    };
    static_assert(sizeof(FoldParams) == 72, "FoldParams layout");
    unsigned levels = 0;
    if (!read_exact(in, &levels, 4)) {
        return 3;
    }
    for (unsigned l = 0; l < levels; ++l) {
        Params p;
        unsigned dims[4];
        if (!read_exact(in, &p, sizeof p) || !read_exact(in, dims, sizeof dims)) {
            return 3;
        }
        for (u64* f : {&p.q, &p.k, &p.v, &p.o, &p.lse, &p.kv_indices, &p.int_ws, &p.partial_o,
                       &p.partial_lse, &p.sinks, &p.mask, &p.mask_indptr}) {
            reloc(*f);
        }
        if (bad) {
            std::fprintf(stderr, "level %u: a pointer outside its buffer\n", l);
            return 7;
        }
        if (dims[0] > 0) {
#if FP_PREFILL
            launch(dims[0], dims[1], PF_THREADS, [p] { fp_prefill(p); });
#else
            launch(dims[0], dims[1], NT, [p] { fp_decode(p); });
#endif
        }
        if (dims[3] && dims[2] > 0) {
            launch(dims[2], 1, 128, [p] { fp_merge(p); });
        }
    }
    FoldParams fp;
    unsigned fold_rows = 0;
    if (!read_exact(in, &fp, sizeof fp) || !read_exact(in, &fold_rows, 4)) {
        return 3;
    }
    std::fclose(in);
    for (u64* f : {&fp.level_o, &fp.level_lse, &fp.o, &fp.lse, &fp.sinks}) {
        reloc(*f);
    }
    if (bad) {
        std::fprintf(stderr, "fold: a pointer outside its buffer\n");
        return 7;
    }
    if (fold_rows > 0) {
        launch(fold_rows, 1, 128, [fp] { fp_cascade_fold(fp); });
    }
    for (int i : {3, 4, 7}) {
        for (size_t j = bufs[i].size() - 16; j < bufs[i].size(); ++j) {
            if (bufs[i][j] != 0) {
                std::fprintf(stderr, "buffer %d written past its end\n", i);
                return 5;
            }
        }
    }
    FILE* out = std::fopen(out_path, "wb");
    if (!out) {
        return 4;
    }
    std::fwrite(bufs[3].data(), 1, bufs[3].size() - 16, out);
    std::fwrite(bufs[4].data(), 1, bufs[4].size() - 16, out);
    std::fclose(out);
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 4 && std::strcmp(argv[1], "--cascade") == 0) {
        return run_cascade(argv[2], argv[3]);
    }
#if FP_PREFILL
    if (argc == 2 && std::strcmp(argv[1], "--self-test") == 0) {
        // The emulated ldmatrix + mma against a plain matrix product (one warp).
        static int mismatches = 0;
        launch(1, 1, 32, [] { tc_self_test_warp(&mismatches); });
        std::printf("tensor-core self-test: %d mismatching elements\n", mismatches);
        return mismatches == 0 ? 0 : 6;
    }
#endif
    if (argc != 3) {
        std::fprintf(stderr, "usage: host_emulation <input> <output>\n");
        return 2;
    }
    FILE* in = std::fopen(argv[1], "rb");
    if (!in) {
        return 2;
    }
    Params p;
    static_assert(sizeof(Params) == 296 + 8 * FP_SCALE_SLOTS, "Params layout");
    if (!read_exact(in, &p, sizeof p)) {
        return 3;
    }
    std::vector<std::vector<unsigned char>> bufs(11);
    for (auto& b : bufs) {
        unsigned long long n = 0;
        if (!read_exact(in, &n, 8)) {
            return 3;
        }
        // 16 spare zero bytes: a read past the end would show as a wrong result, and the
        // kernels must not do it (the test checks every output).
        b.assign(n + 16, 0);
        if (n && !read_exact(in, b.data(), n)) {
            return 3;
        }
    }
    unsigned dims[4];
    if (!read_exact(in, dims, sizeof dims)) {
        return 3;
    }
    std::fclose(in);
    auto addr = [&](int i) { return (u64)(uintptr_t)bufs[i].data(); };
    const size_t float_off_o = p.partial_o, float_off_lse = p.partial_lse;
    p.q = addr(0);
    p.k = addr(1);
    p.v = addr(2);
    p.kv_indices = addr(3);
    p.int_ws = addr(4);
    p.partial_o = addr(5) + float_off_o;
    p.partial_lse = addr(5) + float_off_lse;
    p.o = addr(6);
    p.lse = bufs[7].size() > 16 ? addr(7) : 0;
    p.sinks = bufs[8].size() > 16 ? addr(8) : 0;
    p.mask = p.mask != 0 ? addr(9) : 0;
    p.mask_indptr = addr(10);
    if (dims[0] > 0) {
#if FP_PREFILL
        launch(dims[0], dims[1], PF_THREADS, [p] { fp_prefill(p); });
#else
        launch(dims[0], dims[1], NT, [p] { fp_decode(p); });
#endif
    }
    if (dims[3] && dims[2] > 0) {
        launch(dims[2], 1, 128, [p] { fp_merge(p); });
    }
    // The spare bytes after every buffer the kernels write must be untouched.
    for (int i : {5, 6, 7}) {
        for (size_t j = bufs[i].size() - 16; j < bufs[i].size(); ++j) {
            if (bufs[i][j] != 0) {
                std::fprintf(stderr, "buffer %d written past its end\n", i);
                return 5;
            }
        }
    }
    FILE* out = std::fopen(argv[2], "wb");
    if (!out) {
        return 4;
    }
    std::fwrite(bufs[6].data(), 1, bufs[6].size() - 16, out);
    std::fwrite(bufs[7].data(), 1, bufs[7].size() - 16, out);
    std::fclose(out);
    return 0;
}
