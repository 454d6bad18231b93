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
// Then the loop around the mma.sync is made to issue as little else as it can:
//   * double-buffered fragments: a warp holds two sets of A and B fragments. While the mma.sync of one
//     k16 step run on one set, the ldmatrix of the next step fill the other, so an mma.sync never waits
//     for a load issued just before it. This carries across stages, in the order of CUTLASS's sm80
//     multistage main loop: the last k16 step of a stage first waits for the next stage (cp.async wait
//     and barrier), loads that stage's first fragments, and only then issues its own mma.sync.
//   * addresses computed once: each thread's cp.async sources and destinations and each lane's ldmatrix
//     offsets are worked out before the K loop; inside it every address is one of them plus a constant.
//     The swizzle allows this: it XORs a chunk's bits 0-2 with its bits 3-5, so moving by a multiple of
//     64 chunks (8 lines of 128 bytes) moves the swizzled chunk by just as much, and stages, fragment
//     rows of A, k16 steps of B and copy passes are all such multiples apart (A's second k16 step
//     flips bit 1 of the chunk, which the XOR leaves in place).
//   * serpentine mma.sync order: the warp's rows of mma tiles run left to right and right to left in
//     turn, so the two mma.sync at each turn share a B fragment (CUTLASS's warp-level order).
//   * interior and edge tiles: nearly every tile of a large product lies inside C, where no copy needs
//     a bounds check (only a last K tile that reaches past K tests k). The tile loop is instantiated
//     twice, with the interior's precomputed copies and with the edge tiles' checked ones, which keeps
//     the edge checks' values out of the interior loop's registers.
//   * __launch_bounds__(128, 2): two resident blocks of 128 threads leave each thread 65536 / 256 = 256
//     registers, no fewer than the 255 one thread can address, so the promise costs nothing. The
//     accumulators (128), the two fragment sets (64) and the addresses fill nearly all 255; with the
//     promise ptxas fits them without spilling, with __launch_bounds__(128) alone it spills a few bytes.
// Measured on an H100 (chapter 03): the precomputed addresses (with the serpentine order and the
// interior / edge split) made the kernel faster, and the double-buffered fragments faster still.
// Layouts: a stage holds A's 128 x 32 tile (64-byte rows, two rows per 128-byte line) and B's
// 32 x 128 tile as two panels of 32 rows x 64 columns (128-byte rows). Rows of A and B must be
// 16-byte aligned (K and N multiples of 8, checked by the launcher); M, N and K need not be multiples
// of the tile: chunks past the edges are zero-filled and stores past them are skipped.

#include "tensor_core.cuh"

namespace mma_sync_gemm {
// Measured on an H100 (chapter 03): 128 x 128 tiles with 4 warps, BK = 32 and 4 stages beat 128 x 256
// and 256 x 128 tiles with 8 warps, and deeper or wider stages (narrowly, with the loop below): two
// blocks fit on an SM, and while one waits at its barrier the other keeps the tensor cores busy.
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 128;
constexpr int BLOCKS_PER_SM = 2;                            // promised to ptxas by __launch_bounds__
constexpr int WARP_M = 64, WARP_N = 64;                     // C block per warp: 2 x 2 warps
static_assert((BM / WARP_M) * (BN / WARP_N) * 32 == THREADS, "one warp per C block");
constexpr int FRAGS_M = WARP_M / 16, FRAGS_N = WARP_N / 8;  // mma tiles per warp: 4 x 8
static_assert(BK == 2 * 16, "the main loop is written for two k16 steps per stage, one per fragment buffer");
constexpr int CHUNK = 8;                                    // elements in one 16-byte chunk
constexpr int PANEL = 64;                                   // B is stored in panels of 64 columns
constexpr int GROUP_M = 8;                                  // tile rows walked together (grouped_tile)
constexpr int A_ROW_CHUNKS = BK / CHUNK, B_ROW_CHUNKS = BN / CHUNK;  // chunks in a row of A's / B's tile
constexpr int A_CHUNKS = BM * A_ROW_CHUNKS, B_CHUNKS = BK * B_ROW_CHUNKS;
constexpr int A_BYTES = A_CHUNKS * 16, STAGE_BYTES = A_BYTES + B_CHUNKS * 16;  // B's tile follows A's
// A thread's copies of a stage come in passes of THREADS consecutive chunks: A_PASS_ROWS rows of A's
// tile, B_PASS_ROWS rows of B's.
constexpr int A_COPIES = A_CHUNKS / THREADS, B_COPIES = B_CHUNKS / THREADS;  // per thread and stage
constexpr int A_PASS_ROWS = THREADS / A_ROW_CHUNKS, B_PASS_ROWS = THREADS / B_ROW_CHUNKS;
constexpr int A_PASS_BYTES = THREADS * 16, B_PASS_BYTES = B_PASS_ROWS * (PANEL / CHUNK) * 16;
constexpr int A_FRAG_BYTES = 16 * A_ROW_CHUNKS * 16;     // 16 rows of A's tile: one fragment row to the next
constexpr int B_STEP_BYTES = 16 * (PANEL / CHUNK) * 16;  // 16 rows of a B panel: one k16 step to the next
// Offsets that are multiples of 8 lines of 128 bytes keep the swizzle (see the top of the file).
static_assert(STAGE_BYTES % 1024 == 0 && A_BYTES % 1024 == 0 && A_PASS_BYTES % 1024 == 0 &&
                  B_PASS_BYTES % 1024 == 0 && A_FRAG_BYTES % 1024 == 0 && B_STEP_BYTES % 1024 == 0,
              "an offset moves a swizzled address only if it is a multiple of 1024 bytes");

// Chunk index (in 16-byte units from the start of a stage's B tile) of B's element (k, col): its panel,
// then its row within the panel, then its chunk within the row.
__device__ __forceinline__ unsigned b_chunk(int k, int col) {
    return (col / PANEL) * (BK * PANEL / CHUNK) + k * (PANEL / CHUNK) + (col % PANEL) / CHUNK;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // cp.async, ldmatrix and mma.sync exist from sm_80 on
// ---- copies of one K tile into a stage: cp.async, one commit group per K tile ----------------------
// A tile of C that lies inside C (all rows of A and columns of B it reads exist). A thread copies the
// same chunk column of A and of B in every K tile, so its sources are pointers set once and moved by
// kt * BK along A's rows and kt * BK rows down B, and its destinations are offsets set once. Every
// offset a copy reads from stays below M * K (or K * N) < 2**31: 32-bit arithmetic is enough.
template <typename T>
struct InteriorCopies {
    const T *a, *b;               // the matrices: the source of zero-filled chunks, which cp.async does not read
    const T *a_src, *b_src;       // this thread's first chunks of A and B in K tile 0
    unsigned a_pass, b_pass;      // elements from one pass's chunk to the next: A_PASS_ROWS, B_PASS_ROWS rows
    unsigned b_per_tile;          // elements from one K tile of B to the next: BK rows
    unsigned a_dst, b_dst;        // bytes from a stage's start to where the first chunks land
    int a_k, b_k, k;              // k of the A chunk, and of the first B row, within a K tile; K

    __device__ __forceinline__ InteriorCopies(const T* a, const T* b, int n, int k, int row0, int col0)
        : a(a), b(b), a_pass(A_PASS_ROWS * static_cast<unsigned>(k)), b_pass(B_PASS_ROWS * static_cast<unsigned>(n)),
          b_per_tile(BK * static_cast<unsigned>(n)), k(k) {
        const int tid = threadIdx.x, b_col = (tid % B_ROW_CHUNKS) * CHUNK;
        a_k = (tid % A_ROW_CHUNKS) * CHUNK;
        b_k = tid / B_ROW_CHUNKS;
        a_src = a + static_cast<size_t>(row0 + tid / A_ROW_CHUNKS) * k + a_k;
        b_src = b + static_cast<size_t>(b_k) * n + col0 + b_col;
        a_dst = swizzle_128b(tid) * 16;
        b_dst = A_BYTES + swizzle_128b(b_chunk(b_k, b_col)) * 16;
    }

    __device__ __forceinline__ void start(unsigned stage, int kt) const {
        if ((kt + 1) * BK <= k) {
            copy<false>(stage, kt);
        } else {
            copy<true>(stage, kt);
        }
    }

    // K_TAIL: K tile kt reaches past K, and the chunks there are zero-filled.
    template <bool K_TAIL>
    __device__ __forceinline__ void copy(unsigned stage, int kt) const {
        const int k0 = kt * BK;
        const T* a_at = a_src + k0;
        const T* b_at = b_src + static_cast<unsigned>(kt) * b_per_tile;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            const bool inside = !K_TAIL || k0 + a_k < k;
            cp_async_16(stage + a_dst + j * A_PASS_BYTES, inside ? a_at + j * a_pass : a, inside);
        }
#pragma unroll
        for (int j = 0; j < B_COPIES; ++j) {
            const bool inside = !K_TAIL || k0 + b_k + j * B_PASS_ROWS < k;
            cp_async_16(stage + b_dst + j * B_PASS_BYTES, inside ? b_at + j * b_pass : b, inside);
        }
    }
};

// A tile of C that reaches past M or N: every K tile, each chunk's place is worked out again and checked
// against the edges of A and B; chunks outside are zero-filled. Only the last row and column of tiles
// run this, so it saves registers rather than instructions: no per-thread addresses live across the K loop.
template <typename T>
struct EdgeCopies {
    const T *a, *b;
    int m, n, k, row0, col0;

    __device__ __forceinline__ void start(unsigned stage, int kt) const {
        const int k0 = kt * BK;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            const int i = threadIdx.x + j * THREADS;
            const int r = i / A_ROW_CHUNKS, kk = (i % A_ROW_CHUNKS) * CHUNK;
            const bool inside = row0 + r < m && k0 + kk < k;
            const T* src = inside ? a + static_cast<size_t>(row0 + r) * k + k0 + kk : a;
            cp_async_16(stage + swizzle_128b(i) * 16, src, inside);
        }
#pragma unroll
        for (int j = 0; j < B_COPIES; ++j) {
            const int i = threadIdx.x + j * THREADS;
            const int kk = i / B_ROW_CHUNKS, cc = (i % B_ROW_CHUNKS) * CHUNK;
            const bool inside = k0 + kk < k && col0 + cc < n;
            const T* src = inside ? b + static_cast<size_t>(k0 + kk) * n + col0 + cc : b;
            cp_async_16(stage + A_BYTES + swizzle_128b(b_chunk(kk, cc)) * 16, src, inside);
        }
    }
};

// ---- fragments: ldmatrix from a stage, mma.sync into the accumulators ------------------------------
// One k16 step's operands of a warp: FRAGS_M fragments of A (16 x 16, four registers each) and FRAGS_N
// of B (16 x 8, two registers each).
struct Fragments {
    unsigned a[FRAGS_M][4];
    unsigned b[FRAGS_N][2];
};

struct LaneOffsets {
    unsigned a;                 // A's first fragment row at k16 step 0
    unsigned b[FRAGS_N / 2];    // B's fragments 2p and 2p + 1 at k16 step 0
};

// Where a lane points ldmatrix, in bytes from a stage's start, computed once. Every fragment of every
// stage is one of these plus a constant: fragment row fm of A at k16 step s is at (a ^ s * 32) +
// fm * A_FRAG_BYTES (step 1 reads chunk 2 + lane / 16 of each row: chunk bit 1, which the swizzle's XOR
// leaves in place), B's fragments 2p and 2p + 1 at step s at b[p] + s * B_STEP_BYTES.
// A: lanes 0-15 point at rows 0-15 at k 0-7, lanes 16-31 at the same rows at k 8-15.
// B (.trans): lanes 0-15 at k rows 0-15 of 8 columns, lanes 16-31 at the same rows of the next 8.
__device__ __forceinline__ LaneOffsets lane_offsets(int warp_row, int warp_col) {
    const int lane = threadIdx.x % 32;
    LaneOffsets at;
    at.a = swizzle_128b((warp_row + lane % 16) * A_ROW_CHUNKS + lane / 16) * 16;
#pragma unroll
    for (int p = 0; p < FRAGS_N / 2; ++p)
        at.b[p] = A_BYTES + swizzle_128b(b_chunk(lane % 16, warp_col + p * 16 + (lane / 16) * CHUNK)) * 16;
    return at;
}

// The fragments of k16 step `step` (0 or 1) of a stage: one ldmatrix.x4 per A fragment, one
// ldmatrix.x4.trans per pair of B fragments.
__device__ __forceinline__ void load_fragments(Fragments& f, unsigned stage, const LaneOffsets& at, int step) {
    const unsigned a_step = stage + (at.a ^ step * 32);
#pragma unroll
    for (int fm = 0; fm < FRAGS_M; ++fm) ldmatrix_x4(f.a[fm], a_step + fm * A_FRAG_BYTES);
#pragma unroll
    for (int p = 0; p < FRAGS_N / 2; ++p) {
        unsigned r[4];
        ldmatrix_x4_trans(r, stage + at.b[p] + step * B_STEP_BYTES);
        f.b[2 * p][0] = r[0], f.b[2 * p][1] = r[1], f.b[2 * p + 1][0] = r[2], f.b[2 * p + 1][1] = r[3];
    }
}

// The warp's FRAGS_M x FRAGS_N mma.sync of one k16 step. Serpentine order: even rows run fn up, odd rows
// down, so consecutive mma.sync share an A fragment within a row and a B fragment at each turn.
template <typename T>
__device__ __forceinline__ void warp_mma(float (&acc)[FRAGS_M][FRAGS_N][4], const Fragments& f) {
#pragma unroll
    for (int fm = 0; fm < FRAGS_M; ++fm)
#pragma unroll
        for (int i = 0; i < FRAGS_N; ++i) {
            const int fn = fm % 2 ? FRAGS_N - 1 - i : i;
            mma_m16n8k16<T>(acc[fm][fn], f.a[fm], f.b[fn]);
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

// ---- 6. mma.sync + ldmatrix + cp.async pipeline ---------------------------------------------------
// One block's BM x BN tile of C, its K tiles copied by `copies` (InteriorCopies or EdgeCopies) into the
// STAGES stages that start at shared address `stages`.
template <typename T, typename Copies>
__device__ __forceinline__ void compute_tile(const Copies& copies, T* c, int m, int n, int k, int row0, int col0,
                                             unsigned stages) {
    const int warp = threadIdx.x / 32, warp_row = (warp / (BN / WARP_N)) * WARP_M,
              warp_col = (warp % (BN / WARP_N)) * WARP_N;
    const LaneOffsets at = lane_offsets(warp_row, warp_col);
    const int k_tiles = (k + BK - 1) / BK;
    float acc[FRAGS_M][FRAGS_N][4] = {};
    Fragments frags[2];  // k16 step 0's fragments in frags[0], step 1's in frags[1]

    // Prologue: start copying the first STAGES - 1 tiles (one commit group each, empty past the end),
    // wait for the first, and load its step-0 fragments.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) copies.start(stages + s * STAGE_BYTES, s);
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    int read_stage = 0, write_stage = STAGES - 1;
    unsigned read = stages;
    load_fragments(frags[0], read, at, 0);
    for (int kt = 0; kt < k_tiles; ++kt) {
        // k16 step 0: step 1's ldmatrix go out first, then the copy of tile kt + STAGES - 1 into the stage
        // tile kt - 1 used (everyone finished reading it before the last barrier), then step 0's mma.sync.
        load_fragments(frags[1], read, at, 1);
        if (kt + STAGES - 1 < k_tiles) copies.start(stages + write_stage * STAGE_BYTES, kt + STAGES - 1);
        cp_async_commit();
        write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
        warp_mma<T>(acc, frags[0]);
        // k16 step 1: wait until tile kt + 1 has landed for everyone (the barrier also tells the next
        // refill that everyone has loaded tile kt's last fragments), load its step-0 fragments, then issue
        // step 1's mma.sync. After the last tile these ldmatrix read a stale stage; nothing uses them.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
        read = stages + read_stage * STAGE_BYTES;
        load_fragments(frags[0], read, at, 0);
        warp_mma<T>(acc, frags[1]);
    }
    store_c<T>(c, acc, m, n, row0 + warp_row, col0 + warp_col);
}
#endif
}  // namespace mma_sync_gemm

// A block of 4 warps computes a 128 x 128 tile of C (1-D grid, see grouped_tile). Dynamic shared memory
// holds the STAGES stages (64 KiB; the launcher opts in above the default 48 KiB).
template <typename T>
__global__ void __launch_bounds__(mma_sync_gemm::THREADS, mma_sync_gemm::BLOCKS_PER_SM)
    gemm_mma_sync(T* __restrict__ c, const T* __restrict__ a, const T* __restrict__ b, int m, int n, int k) {
#if __CUDA_ARCH__ >= 800
    using namespace mma_sync_gemm;
    extern __shared__ __align__(128) unsigned char stages[];
    int tile_m, tile_n;
    grouped_tile((m + BM - 1) / BM, (n + BN - 1) / BN, GROUP_M, tile_m, tile_n);
    const int row0 = tile_m * BM, col0 = tile_n * BN;
    if (row0 + BM <= m && col0 + BN <= n) {
        compute_tile<T>(InteriorCopies<T>(a, b, n, k, row0, col0), c, m, n, k, row0, col0, smem_address(stages));
    } else {
        compute_tile<T>(EdgeCopies<T>{a, b, m, n, k, row0, col0}, c, m, n, k, row0, col0, smem_address(stages));
    }
#else
    __trap();  // unreachable: the launcher refuses mma.sync below sm_80
#endif
}

template __global__ void gemm_mma_sync<__half>(__half*, const __half*, const __half*, int, int, int);
template __global__ void gemm_mma_sync<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int,
                                                      int, int);
