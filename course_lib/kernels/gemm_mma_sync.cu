// GEMM step 6: mma.sync tensor cores fed by ldmatrix from a cp.async pipeline in swizzled shared memory.
//
// C = A @ B with A [M, K] and B [K, N] row-major, fp16 or bf16, fp32 accumulators (sm_80 and newer).
// What changes from step 5 (WMMA), and why each piece is there:
//   * mma.sync m16n8k16 is the instruction WMMA compiles to, but here we own the fragments: each warp
//     keeps a 64 x 64 block of C in registers (128 fp32 per thread) and reuses every A fragment for
//     8 products and every B fragment for 4.
//   * ldmatrix loads those fragments from shared memory, four 8x8 tiles per instruction, already in
//     the lane order mma.sync wants (.trans for B, which is stored k-major in the tile).
//   * cp.async copies global -> shared without a round trip through registers, so a block can keep
//     STAGES - 1 tiles of K in flight while it computes on the oldest one: the load latency hides
//     behind the tensor-core work.
//   * the tiles are stored with the 128-byte XOR swizzle of tensor_core.cuh, so neither the 16-byte
//     cp.async writes nor the ldmatrix reads conflict on shared-memory banks.
// Layouts: a stage holds A's 128 x 32 tile (64-byte rows, two rows per 128-byte line) and B's
// 32 x 128 tile as two panels of 32 rows x 64 columns (128-byte rows). Rows of A and B must be
// 16-byte aligned (K and N multiples of 8, checked by the launcher); M, N and K need not be multiples
// of the tile: chunks past the edges are zero-filled and stores past them are skipped.

#include "tensor_core.cuh"

namespace mma_sync_gemm {
// Measured on an H100 (chapter 03): 128 x 128 tiles with 4 warps, BK = 32 and 4 stages beat 128 x 256
// tiles with 8 warps and deeper or wider stages: two blocks fit on an SM, and while one waits at its
// barrier the other keeps the tensor cores busy.
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 128;
constexpr int WARP_M = 64, WARP_N = 64;                     // C block per warp: 2 x 2 warps
static_assert((BM / WARP_M) * (BN / WARP_N) * 32 == THREADS, "one warp per C block");
constexpr int FRAGS_M = WARP_M / 16, FRAGS_N = WARP_N / 8;  // mma tiles per warp: 4 x 8
constexpr int CHUNK = 8;                                    // elements in one 16-byte chunk
constexpr int PANEL = 64;                                   // B is stored in panels of 64 columns
constexpr int GROUP_M = 8;                                  // tile rows walked together (grouped_tile)
constexpr int A_CHUNKS = BM * BK / CHUNK, B_CHUNKS = BK * BN / CHUNK, STAGE_BYTES = (A_CHUNKS + B_CHUNKS) * 16;

// Chunk index (in 16-byte units from the start of a stage's B tile) of B's element (k, col): its panel,
// then its row within the panel, then its chunk within the row.
__device__ __forceinline__ unsigned b_chunk(int k, int col) {
    return (col / PANEL) * (BK * PANEL / CHUNK) + k * (PANEL / CHUNK) + (col % PANEL) / CHUNK;
}

// Issue the cp.async copies of one K tile (tile index kt) into a stage: every thread copies the same
// number of chunks, in loops with a fixed trip count, so the compiler unrolls them and keeps the
// per-chunk offsets in registers (index arithmetic here costs issue slots the tensor cores need).
// Only tiles that reach past an edge of A or B (EDGES) pay for the bounds checks.
template <typename T, bool EDGES>
__device__ __forceinline__ void load_stage(unsigned a_stage, unsigned b_stage, const T* a, const T* b, int m, int n,
                                           int k, int row0, int col0, int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int j = 0; j < A_CHUNKS / THREADS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        const int r = i / (BK / CHUNK), kk = (i % (BK / CHUNK)) * CHUNK;  // A rows are BK / 8 chunks long
        const bool inside = !EDGES || (row0 + r < m && k0 + kk < k);
        const T* src = inside ? a + static_cast<size_t>(row0 + r) * k + k0 + kk : a;
        cp_async_16(a_stage + swizzle_128b(i) * 16, src, inside);
    }
#pragma unroll
    for (int j = 0; j < B_CHUNKS / THREADS; ++j) {
        const int i = threadIdx.x + j * THREADS;
        const int kk = i / (BN / CHUNK), cc = (i % (BN / CHUNK)) * CHUNK;
        const bool inside = !EDGES || (k0 + kk < k && col0 + cc < n);
        const T* src = inside ? b + static_cast<size_t>(k0 + kk) * n + col0 + cc : b;
        cp_async_16(b_stage + swizzle_128b(b_chunk(kk, cc)) * 16, src, inside);
    }
}

// One warp's share of one stage: two k16 steps, each 4 ldmatrix for A, 4 for B and 32 mma.sync.
template <typename T>
__device__ __forceinline__ void compute_stage(float (&acc)[FRAGS_M][FRAGS_N][4], unsigned a_stage, unsigned b_stage,
                                              int warp_row, int warp_col) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int k16 = 0; k16 < BK / 16; ++k16) {
        unsigned a_frag[FRAGS_M][4], b_frag[FRAGS_N][2];
#pragma unroll
        for (int fm = 0; fm < FRAGS_M; ++fm) {  // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: the same rows at k 8-15
            const int row = warp_row + fm * 16 + lane % 16, chunk = k16 * 2 + lane / 16;
            ldmatrix_x4(a_frag[fm], a_stage + swizzle_128b(row * (BK / CHUNK) + chunk) * 16);
        }
#pragma unroll
        for (int fn = 0; fn < FRAGS_N; fn += 2) {  // lanes 0-15: k rows 0-15 of columns 0-7; 16-31: columns 8-15
            const int k = k16 * 16 + lane % 16, col = warp_col + fn * 8 + (lane / 16) * CHUNK;
            unsigned r[4];
            ldmatrix_x4_trans(r, b_stage + swizzle_128b(b_chunk(k, col)) * 16);
            b_frag[fn][0] = r[0], b_frag[fn][1] = r[1], b_frag[fn + 1][0] = r[2], b_frag[fn + 1][1] = r[3];
        }
#pragma unroll
        for (int fm = 0; fm < FRAGS_M; ++fm)
#pragma unroll
            for (int fn = 0; fn < FRAGS_N; ++fn) mma_m16n8k16<T>(acc[fm][fn], a_frag[fm], b_frag[fn]);
    }
}

// Each lane holds, per mma tile, C[g][2t..2t+1] and C[g+8][2t..2t+1] (g = lane / 4, t = lane % 4).
template <typename T>
__device__ __forceinline__ void store_c(T* c, const float (&acc)[FRAGS_M][FRAGS_N][4], int m, int n, int row0,
                                        int col0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int fm = 0; fm < FRAGS_M; ++fm)
#pragma unroll
        for (int fn = 0; fn < FRAGS_N; ++fn)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row0 + fm * 16 + lane / 4 + half * 8, col = col0 + fn * 8 + (lane % 4) * 2;
                if (row < m && col < n)  // N is even, so col + 1 < n too
                    *reinterpret_cast<unsigned*>(c + static_cast<size_t>(row) * n + col) =
                        pack_pair<T>(acc[fm][fn][half * 2], acc[fm][fn][half * 2 + 1]);
            }
}
}  // namespace mma_sync_gemm

// ---- 6. mma.sync + ldmatrix + cp.async pipeline ---------------------------------------------------
// A block of 4 warps computes a 128 x 128 tile of C (1-D grid, see grouped_tile). Dynamic shared memory
// holds the STAGES stages (64 KiB; the launcher opts in above the default 48 KiB).
template <typename T>
__global__ void __launch_bounds__(mma_sync_gemm::THREADS)
    gemm_mma_sync(T* __restrict__ c, const T* __restrict__ a, const T* __restrict__ b, int m, int n, int k) {
#if __CUDA_ARCH__ >= 800
    using namespace mma_sync_gemm;
    extern __shared__ __align__(128) unsigned char stages[];
    const unsigned base = smem_address(stages);
    auto a_stage = [&](int s) { return base + s * STAGE_BYTES; };
    auto b_stage = [&](int s) { return base + s * STAGE_BYTES + A_CHUNKS * 16; };

    int tile_m, tile_n;
    grouped_tile((m + BM - 1) / BM, (n + BN - 1) / BN, GROUP_M, tile_m, tile_n);
    const int row0 = tile_m * BM, col0 = tile_n * BN;
    const int warp = threadIdx.x / 32, warp_row = (warp / (BN / WARP_N)) * WARP_M,
              warp_col = (warp % (BN / WARP_N)) * WARP_N;
    const int k_tiles = (k + BK - 1) / BK;
    float acc[FRAGS_M][FRAGS_N][4] = {};

    const bool interior = row0 + BM <= m && col0 + BN <= n;
    auto load = [&](int s, int kt) {  // start copying K tile kt into stage s
        if (interior && (kt + 1) * BK <= k) {
            load_stage<T, false>(a_stage(s), b_stage(s), a, b, m, n, k, row0, col0, kt);
        } else {
            load_stage<T, true>(a_stage(s), b_stage(s), a, b, m, n, k, row0, col0, kt);
        }
    };

    // Prologue: start loading the first STAGES - 1 tiles (one commit group each, empty past the end).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed...
        __syncthreads();              // ...and everyone's; everyone is also done with tile kt - 1
        const int next = kt + STAGES - 1;  // refill the stage tile kt - 1 used
        if (next < k_tiles) load(next % STAGES, next);
        cp_async_commit();
        compute_stage<T>(acc, a_stage(kt % STAGES), b_stage(kt % STAGES), warp_row, warp_col);
    }
    store_c<T>(c, acc, m, n, row0 + warp_row, col0 + warp_col);
#else
    __trap();  // unreachable: the launcher refuses mma.sync below sm_80
#endif
}

template __global__ void gemm_mma_sync<__half>(__half*, const __half*, const __half*, int, int, int);
template __global__ void gemm_mma_sync<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int,
                                                      int, int);
