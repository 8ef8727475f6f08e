// Host versions of the warp-level tensor-core instructions the prefill kernel uses
// (kernels/prefill.cu), included by host_emulation.cpp after common.cuh. Every one follows
// the PTX ISA's definition of which lane holds which matrix element, so a kernel that puts a
// fragment in the wrong register computes a wrong result here too:
//
// - mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: PTX ISA 9.7.14.5.8,
//   "Matrix Fragments for mma.m16n8k16 with floating point type". groupID = lane >> 2,
//   threadID_in_group = lane % 4. A (16 x 16): four .b32 registers holding a0..a7, two
//   16-bit elements each, the lower-numbered one in the low half; a_i is at row groupID for
//   i < 2 or 4 <= i < 6, else groupID + 8, and column threadID_in_group * 2 + (i & 1), plus 8
//   for i >= 4. B (16 x 8): two registers, b0..b3 at row threadID_in_group * 2 + (i & 1),
//   plus 8 for i >= 2, column groupID. C and D (16 x 8, f32): c0..c3 at row groupID for
//   i < 2, else groupID + 8, column threadID_in_group * 2 + (i & 1).
// - ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: PTX ISA 9.7.9.x, "Warp-level matrix
//   load instruction: ldmatrix". Lanes 8j..8j+7 supply the addresses of rows 0..7 of matrix
//   j, destination register j receives matrix j. Without .trans lane l receives row l / 4,
//   elements 2 (l % 4) and 2 (l % 4) + 1 (low half first); with .trans it receives the
//   element at row 2 (l % 4) (low half) and row 2 (l % 4) + 1 (high half), column l / 4.
// - cp.async.cg.shared.global (16 bytes), cp.async.commit_group, cp.async.wait_group 0:
//   PTX ISA 9.7.9.25, "Data Movement and Conversion Instructions: cp.async". Copies are
//   queued per thread and performed only when the issuing thread waits for their group
//   (wait_group N completes all but the N most recent committed groups; copies not yet
//   committed are not waited for), so a read of shared memory before the wait and the
//   barrier that publishes it sees the old contents, as it may on the device.
// - __any_sync / __all_sync (vote.sync) and cvt.rn.{bf16x2,f16x2}.f32 (round to nearest
//   even, first source in the upper half).
//
// Warp-collective operations exchange through per-warp buffers between two warp barriers, as
// the shuffles in host_emulation.cpp do: lanes that do not reach one together deadlock.

#include <deque>

namespace tc_emu {

constexpr int kMaxThreads = 1024;
// Per lane: 4 A words, 2 B words (mma); or one address (ldmatrix); or one vote.
static u32 g_words[kMaxThreads][6];
static const unsigned char* g_addr[kMaxThreads];
static int g_vote[kMaxThreads];

static inline void warp_wait() { g_sync->warp[threadIdx.x / 32].arrive_and_wait(); }

static inline float half_to_f32(u32 h) {
#if FP_DTYPE == 2
    return __uint_as_float((h & 0xffffu) << 16);
#else
    return f16_bits_to_f32(h);
#endif
}

static inline u32 lo16(u32 w) { return w & 0xffffu; }
static inline u32 hi16(u32 w) { return w >> 16; }

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
};
struct CpAsyncQueue {
    std::vector<Copy> open;                 // issued, not yet committed
    std::deque<std::vector<Copy>> groups;   // committed, oldest first
};
// One queue per CUDA thread (the threads are fibers of one host thread).
static CpAsyncQueue t_cp_of[kMaxThreads];
static inline CpAsyncQueue& cp_queue() { return t_cp_of[threadIdx.x]; }

}  // namespace tc_emu

// d += A B for one warp (see the layout above). Accumulation in double, rounded once to f32
// per element (the device's tensor cores add the exact products at least as precisely).
static inline void pf_mma(float* d, const u32* a, const u32* b) {
    using namespace tc_emu;
    const int w0 = (threadIdx.x / 32) * 32;
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) {
        g_words[threadIdx.x][i] = a[i];
    }
    g_words[threadIdx.x][4] = b[0];
    g_words[threadIdx.x][5] = b[1];
    warp_wait();
    float A[16][16];
    float B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2;
        const int tig = l & 3;
        const u32* r = g_words[w0 + l];
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            const u32 word = r[i / 2];
            A[row][col] = half_to_f32((i & 1) ? hi16(word) : lo16(word));
        }
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            const u32 word = r[4 + i / 2];
            B[row][gid] = half_to_f32((i & 1) ? hi16(word) : lo16(word));
        }
    }
    warp_wait();
    const int gid = lane >> 2;
    const int tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? gid : gid + 8;
        const int col = tig * 2 + (i & 1);
        double acc = d[i];
        for (int k = 0; k < 16; ++k) {
            acc += (double)A[row][k] * (double)B[k][col];
        }
        d[i] = (float)acc;
    }
}

static inline void tc_ldsm_x4(u32* r, const void* row, bool trans) {
    using namespace tc_emu;
    const int w0 = (threadIdx.x / 32) * 32;
    const int lane = threadIdx.x % 32;
    g_addr[threadIdx.x] = static_cast<const unsigned char*>(row);
    warp_wait();
    for (int j = 0; j < 4; ++j) {
        u32 h[2];
        for (int e = 0; e < 2; ++e) {
            const unsigned char* src;
            if (!trans) {
                // Row lane / 4 of matrix j, element 2 (lane % 4) + e.
                src = g_addr[w0 + 8 * j + lane / 4] + 2 * (2 * (lane % 4) + e);
            } else {
                // Row 2 (lane % 4) + e of matrix j, element lane / 4.
                src = g_addr[w0 + 8 * j + 2 * (lane % 4) + e] + 2 * (lane / 4);
            }
            unsigned short v;
            std::memcpy(&v, src, 2);
            h[e] = v;
        }
        r[j] = h[0] | (h[1] << 16);
    }
    warp_wait();
}

static inline void pf_ldsm_x4(u32* r, const void* row) { tc_ldsm_x4(r, row, false); }
static inline void pf_ldsm_x4_trans(u32* r, const void* row) { tc_ldsm_x4(r, row, true); }

static inline void pf_cp_async16(void* dst, const void* src) {
    tc_emu::cp_queue().open.push_back(tc_emu::Copy{static_cast<unsigned char*>(dst),
                                             static_cast<const unsigned char*>(src)});
}

static inline void pf_cp_async_commit() {
    tc_emu::cp_queue().groups.push_back(std::move(tc_emu::cp_queue().open));
    tc_emu::cp_queue().open.clear();
}

// cp.async.wait_group 0: every committed group completes.
static inline void pf_cp_async_wait_all() {
    for (auto& grp : tc_emu::cp_queue().groups) {
        for (const auto& c : grp) {
            std::memcpy(c.dst, c.src, 16);
        }
    }
    tc_emu::cp_queue().groups.clear();
}

static inline u32 pf_pack2(float lo, float hi) { return f32_to_pair(lo, hi); }

static inline int tc_vote(int pred, bool any) {
    using namespace tc_emu;
    const int w0 = (threadIdx.x / 32) * 32;
    g_vote[threadIdx.x] = pred ? 1 : 0;
    warp_wait();
    int r = any ? 0 : 1;
    for (int l = 0; l < 32; ++l) {
        r = any ? (r | g_vote[w0 + l]) : (r & g_vote[w0 + l]);
    }
    warp_wait();
    return r;
}

static inline int __any_sync(unsigned, int pred) { return tc_vote(pred, true); }
static inline int __all_sync(unsigned, int pred) { return tc_vote(pred, false); }

// Self-test of the fragment layouts (host_emulation --self-test): one m16n8k16 product of
// distinct values through ldmatrix (A and B loaded from row-major shared tiles, B both as
// K-major rows with .trans and as N-major rows without) against a plain triple loop, on one
// emulated warp. Returns the number of mismatching elements.
static int tc_self_test_warp(int* mismatches) {
    using namespace tc_emu;
    // Distinct small integers: exact in bf16 and f16 and in the f32 sums.
    alignas(16) static unsigned short sa[16 * 24];   // A, 16 x 16, row stride 24
    alignas(16) static unsigned short sbk[16 * 16];  // B as K x N rows (16 x 8), stride 16
    alignas(16) static unsigned short sbn[8 * 24];   // B^T as N x K rows (8 x 16), stride 24
    const int lane = threadIdx.x % 32;
    auto val_a = [](int r, int c) { return (float)((r * 16 + c) % 29 - 14); };
    auto val_b = [](int k, int n) { return (float)((k * 8 + n * 3) % 31 - 15); };
    auto bits = [](float f) -> unsigned short {
#if FP_DTYPE == 2
        return (unsigned short)f32_to_bf16_bits(f);
#else
        return (unsigned short)f32_to_f16_bits(f);
#endif
    };
    if (lane == 0) {
        for (int r = 0; r < 16; ++r) {
            for (int c = 0; c < 16; ++c) {
                sa[r * 24 + c] = bits(val_a(r, c));
            }
        }
        for (int k = 0; k < 16; ++k) {
            for (int n = 0; n < 8; ++n) {
                sbk[k * 16 + n] = bits(val_b(k, n));
                sbn[n * 24 + k] = bits(val_b(k, n));
            }
        }
    }
    warp_wait();
    // A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
    // (rows 8-15, cols 8-15) are registers a0a1, a2a3, a4a5, a6a7.
    u32 a[4];
    pf_ldsm_x4(a, sa + ((lane & 7) + ((lane >> 3) & 1) * 8) * 24 + (lane >> 4) * 8);
    // B from K-major rows with .trans: matrices (k 0-7), (k 8-15), repeated for x4.
    u32 bt[4];
    pf_ldsm_x4_trans(bt, sbk + ((lane & 7) + ((lane >> 3) & 1) * 8) * 16);
    // B from N-major rows without .trans: matrices (k 0-7), (k 8-15).
    u32 bn[4];
    pf_ldsm_x4(bn, sbn + (lane & 7) * 24 + ((lane >> 3) & 1) * 8);
    float d1[4] = {0.5f, -1.f, 2.f, 0.25f};
    float d2[4] = {0.5f, -1.f, 2.f, 0.25f};
    pf_mma(d1, a, bt);
    pf_mma(d2, a, bn);
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const float c0[4] = {0.5f, -1.f, 2.f, 0.25f};
    int bad = 0;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? gid : gid + 8;
        const int col = tig * 2 + (i & 1);
        float want = c0[i];
        for (int k = 0; k < 16; ++k) {
            want += val_a(row, k) * val_b(k, col);
        }
        bad += d1[i] != want;
        bad += d2[i] != want;
    }
    __atomic_fetch_add(mismatches, bad, __ATOMIC_RELAXED);
    return bad;
}
