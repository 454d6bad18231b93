// Prefill attention over a paged KV cache, FlashAttention-2 style, on the tensor cores (issue 19).
//
// STATUS: the first version's GPU tests (tests/test_paged_prefill_kernel.py, against prefill_reference in float64)
// passed on an H100 80GB node (2026-12-07); this version (two m16 tiles a warp) has not run on a GPU yet. Its tests
// pass on the CPU under the course's warp emulator (course_lib/emulator), which runs this source unchanged, with ldmatrix, mma.sync and cp.async written from the PTX ISA. Its speed against
// PyTorch's SDPA is recorded by `python -m course_lib.bench prefill` and its Nsight Compute profile by `... profile`.
// paged_prefill_reference.tiled_prefill is the same algorithm in NumPy, loop for loop.
//
// The problem: a step of new tokens (whole prompts, chunks of long prompts, prompts after a prefix-cache hit)
// whose keys and values are already in the cache. Sequence s owns query rows query_start_loc[s] ..
// query_start_loc[s + 1] - 1, at positions context_len - new .. context_len - 1; each attends causally to
// every position <= its own, read through the sequence's block table. Decode's kernel would read each key once
// per query; here a thread block reads each key tile once for ROWS query rows, so the work becomes two matrix
// products per tile that mma.sync runs on the tensor cores: S = Q Kᵀ and O += P V.
//
// Who does what (for the tiling the launcher uses, M_TILES = 2 and KEY_TILE = 32; both are template parameters):
//   * a block owns ROWS = 128 query rows of one sequence and one kv head. A row is a (position, query head)
//     pair, flattened position-major over the kv head's group of query heads (GQA): with 4 query heads per kv
//     head, 128 rows are 32 positions x 4 heads, and every K/V tile serves all of them. Any group size works:
//     row f of the sequence's (new_tokens * group) rows is position f / group, head f % group.
//   * 4 warps x 32 rows: warp w computes rows 32w .. 32w + 31 (M_TILES = 2 m16 tiles of mma.sync) against
//     every key of the tile, so the softmax of a row never leaves its warp. Two m16 tiles per warp make each
//     K or V fragment that ldmatrix brings from shared memory feed two mma.sync instead of one: with one tile
//     per warp (the kernel's first version, M_TILES = 1 and KEY_TILE = 64, still built for comparison) shared
//     memory, not the tensor cores, set the pace. The Q fragments are read from shared memory at every k16
//     step: kept in registers too, they would not fit beside the accumulators (2 x 16 x HEAD_DIM / 32 values
//     of O and 2 x 16 x KEY_TILE / 32 of S per lane; at KEY_TILE = 64 and head_dim 128 even S and O alone
//     would make the compiler spill, hence key tiles of 32).
//   * the grid's x runs backwards over the query tiles: the last tile of a sequence has the most keys to
//     read, and starting it first keeps the SMs from waiting on a few long blocks at the end (causal work is
//     a triangle).
//   * the key loop walks tiles of KEY_TILE = 32 positions from 0 to the block's last query position (keys
//     after it are masked for every row, so never loaded). cp.async copies tile t + 1 into the other of
//     STAGES = 2 shared-memory buffers while the warps compute on tile t. Each 16-byte chunk looks up its
//     cache block in the table: a tile spans several blocks and may start in the middle of one.
//   * online softmax in registers: each row keeps a running max m (in log2 units: the logits are scaled by
//     scale * log2(e) so exp2f does the exponentials), and a running sum l; when a tile raises m, the sum and
//     the output accumulator are multiplied by exp2(m_old - m_new) before the tile's terms are added. The
//     accumulator is divided by l once, at the end.
//   * the causal mask is applied only on diagonal tiles: those whose last key lies after the block's first
//     query position. Every earlier tile is visible to every row of the block, and skips the compares.
//     The mask also hides the zero-filled keys past the block's last query (a partial last tile).
//   * rows past the sequence's last row (a partial query tile) load zeros, compute harmlessly and are not
//     stored.
// Fragment layouts (PTX ISA, mma.m16n8k16): the accumulator of an m16n8 tile gives lane l the elements
// (row l/4, cols 2(l%4), 2(l%4)+1) in c0,c1 and row l/4 + 8 in c2,c3. That is exactly the A fragment layout
// for the next product's k16 step when two n8 tiles are packed pairwise, so P goes from the S accumulators to
// P V's A operand in registers, rounded to T, with no trip through shared memory (FlashAttention-2's trick).
// K is stored [key][dim], which is the "col" B operand of Q Kᵀ as it is: ldmatrix without .trans. V is
// stored [key][dim] too, but P V needs it k-major (k = key): ldmatrix.trans hands out the transpose.
// Shared-memory tiles are [rows][HEAD_DIM] with the 16-byte chunk index of row r XOR-ed with r % 8
// (the 128-byte swizzle of tensor_core.cuh, applied within each 128-byte line): the 8 rows an ldmatrix
// reads at one chunk then fall in 8 different groups of 4 banks.
// Left for later, measured first: splitting the K and V waits, a third stage, storing O through shared memory
// for wider stores, sm_90's wgmma and TMA.
// The host (paged_prefill.py) checks every table entry, length and offset before a launch.

#include "elements.cuh"
#include "tensor_core.cuh"

namespace prefill {
// The launcher (paged_prefill.py) sizes the grid and the dynamic shared memory from these and from the tiling's
// template parameters; its tests check that the numbers there match these lines.
constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int STAGES = 2;  // K/V tiles in shared memory: one computed on while the next is copied
constexpr int CHUNK = 8;   // fp16/bf16 values in 16 bytes: one cp.async, one ldmatrix row

constexpr float LOG2E = 1.4426950408889634f;
__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// Element offset of chunk `chunk` of row `row` in a swizzled [rows][HEAD_DIM] tile.
template <int HEAD_DIM>
__device__ __forceinline__ int swizzled(int row, int chunk) {
    return (row * (HEAD_DIM / CHUNK) + (chunk ^ (row & 7))) * CHUNK;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // cp.async, ldmatrix and mma.sync exist from sm_80 on

// Copy TILE_ROWS rows of HEAD_DIM values into a swizzled shared tile, 16 bytes per cp.async, all THREADS threads
// taking part. `row_start(row)` is the element offset of a row in global memory, or -1 for a row to zero-fill
// (its source is then neither computed from a table nor read). With a second pair of pointers, the same rows of
// a second array (V beside K: one table lookup serves both).
template <int TILE_ROWS, int HEAD_DIM, typename T, typename RowStart>
__device__ __forceinline__ void copy_rows(T* dst, const T* src, T* dst2, const T* src2, RowStart row_start) {
    constexpr int ROW_CHUNKS = HEAD_DIM / CHUNK;
#pragma unroll
    for (int c = threadIdx.x; c < TILE_ROWS * ROW_CHUNKS; c += THREADS) {
        const int row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS, at = swizzled<HEAD_DIM>(row, chunk);
        const long long first = row_start(row);
        const bool inside = first >= 0;
        const size_t offset = inside ? static_cast<size_t>(first) + chunk * CHUNK : 0;
        cp_async_16(smem_address(dst + at), src + offset, inside);
        if (dst2 != nullptr) cp_async_16(smem_address(dst2 + at), src2 + offset, inside);
    }
}

// The K and V rows of positions [start, start + KEY_TILE) of one kv head, into a stage; positions at or past
// `end` are zero-filled and their block-table entries never read.
template <typename T, int HEAD_DIM, int KEY_TILE>
__device__ __forceinline__ void load_kv_tile(T* keys, T* values, const T* key_cache, const T* value_cache,
                                             const int* table, int start, int end, int kv_head, int num_kv_heads,
                                             int block_size) {
    copy_rows<KEY_TILE, HEAD_DIM>(keys, key_cache, values, value_cache, [&](int row) -> long long {
        const int position = start + row;
        if (position >= end) return -1;
        return ((static_cast<long long>(table[position / block_size]) * num_kv_heads + kv_head) * block_size +
                position % block_size) * HEAD_DIM;
    });
}

// The block's ROWS query rows, into shared memory; rows past the sequence's rows are zero-filled.
template <typename T, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void load_queries(T* queries, const T* query, int first_token, int first_row, int rows,
                                             int group, int head0, int num_heads) {
    copy_rows<ROWS, HEAD_DIM>(queries, query, static_cast<T*>(nullptr), query, [&](int row) -> long long {
        const int f = first_row + row;
        if (f >= rows) return -1;
        return (static_cast<long long>(first_token + f / group) * num_heads + head0 + f % group) * HEAD_DIM;
    });
}

// Max and sum over the 4 lanes that share an accumulator row (lanes 4g .. 4g + 3).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

#endif
}  // namespace prefill

// ROWS = 4 warps x M_TILES x 16 query rows a block, KEY_TILE keys a step of the key loop.
// grid (ceil(max_new_tokens * group / ROWS), num_kv_heads, num_seqs), THREADS threads, dynamic shared memory
// (ROWS + STAGES * 2 * KEY_TILE) * HEAD_DIM elements. query and out are [total_new_tokens, num_heads,
// HEAD_DIM]; caches [num_blocks, num_kv_heads, block_size, HEAD_DIM]; block_tables [num_seqs, max_blocks];
// query_start_loc [num_seqs + 1]; context_lens [num_seqs]. scale_log2 = scale * log2(e).
template <typename T, int HEAD_DIM, int M_TILES, int KEY_TILE>
__global__ void __launch_bounds__(prefill::THREADS)
    paged_prefill(T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ key_cache,
                  const T* __restrict__ value_cache, const int* __restrict__ block_tables,
                  const int* __restrict__ query_start_loc, const int* __restrict__ context_lens, int num_heads,
                  int num_kv_heads, int block_size, int max_blocks, float scale_log2) {
#if __CUDA_ARCH__ >= 800
    using namespace prefill;
    static_assert(HEAD_DIM % 16 == 0, "head_dim is whole k16 steps of Q Kᵀ and pairs of n8 tiles of P V");
    static_assert(KEY_TILE % 16 == 0, "the key tile is whole k16 steps of P V");
    constexpr int ROWS = WARPS * M_TILES * 16;  // query rows a block owns
    constexpr int K_STEPS = HEAD_DIM / 16;  // k16 steps of Q Kᵀ
    constexpr int S_TILES = KEY_TILE / 8;   // n8 tiles of S per warp
    constexpr int O_TILES = HEAD_DIM / 8;   // n8 tiles of O per warp
    constexpr int TILE_ELEMENTS = KEY_TILE * HEAD_DIM;
    extern __shared__ __align__(128) unsigned char shared[];
    T* queries = reinterpret_cast<T*>(shared);  // [ROWS][HEAD_DIM], then STAGES x (K tile, V tile)
    auto keys = [&](int stage) { return queries + ROWS * HEAD_DIM + stage * 2 * TILE_ELEMENTS; };
    auto values = [&](int stage) { return queries + ROWS * HEAD_DIM + (stage * 2 + 1) * TILE_ELEMENTS; };

    const int seq = blockIdx.z, kv_head = blockIdx.y, group = num_heads / num_kv_heads;
    const int first_token = query_start_loc[seq], new_tokens = query_start_loc[seq + 1] - first_token;
    const int rows = new_tokens * group, first_row = (gridDim.x - 1 - blockIdx.x) * ROWS;  // longest tiles first
    if (first_row >= rows) return;  // a query tile past this sequence's rows (the grid fits the longest one)
    const int context = context_lens[seq], first_position = context - new_tokens;
    const int query_start = first_position + first_row / group;                     // the block's first position
    const int key_end = first_position + (min(first_row + ROWS, rows) - 1) / group + 1;  // its last + 1
    const int tiles = (key_end + KEY_TILE - 1) / KEY_TILE;
    const int* table = block_tables + static_cast<size_t>(seq) * max_blocks;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row = warp * M_TILES * 16;  // the warp's first row in the block

    load_queries<T, HEAD_DIM, ROWS>(queries, query, first_token, first_row, rows, group, kv_head * group, num_heads);
    auto load = [&](int t) {  // start copying key tile t into stage t % STAGES (an empty group past the end)
        if (t < tiles)
            load_kv_tile<T, HEAD_DIM, KEY_TILE>(keys(t % STAGES), values(t % STAGES), key_cache, value_cache, table,
                                      t * KEY_TILE, key_end, kv_head, num_kv_heads, block_size);
        cp_async_commit();
    };
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) load(t);  // the queries travel in the first group

    // This lane's accumulator rows: in m16 tile i, warp rows 16i + lane/4 (half 0) and 16i + lane/4 + 8
    // (half 1). Rows past the sequence's end take the last row's position: they compute finite numbers that
    // are never stored.
    int position[M_TILES][2];
#pragma unroll
    for (int i = 0; i < M_TILES; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int f = min(first_row + warp_row + 16 * i + lane / 4 + half * 8, rows - 1);
            position[i][half] = first_position + f / group;
        }
    float o[M_TILES][O_TILES][4] = {};  // the output accumulator, unnormalised
    float m[M_TILES][2], l[M_TILES][2];  // each row's running max (log2 units) and this lane's part of its sum
#pragma unroll
    for (int i = 0; i < M_TILES; ++i) m[i][0] = m[i][1] = negative_infinity(), l[i][0] = l[i][1] = 0.0f;

    for (int t = 0; t < tiles; ++t) {
        load(t + STAGES - 1);       // refills the stage tile t - 1 used (every warp passed the barrier below)
        cp_async_wait<STAGES - 1>();  // this thread's copies of tile t (and the queries) have landed
        __syncthreads();            // ... and everyone else's
        const T* k_tile = keys(t % STAGES);
        const T* v_tile = values(t % STAGES);

        // S = Q Kᵀ: [M_TILES x 16 rows x KEY_TILE keys] per warp, fp32.
        float s[M_TILES][S_TILES][4] = {};
#pragma unroll
        for (int k = 0; k < K_STEPS; ++k) {
            unsigned q[M_TILES][4];  // lanes 0-15 give rows 0-15 of the m16 tile at chunk 2k, lanes 16-31 at 2k + 1
#pragma unroll
            for (int i = 0; i < M_TILES; ++i)
                ldmatrix_x4(q[i], smem_address(queries + swizzled<HEAD_DIM>(warp_row + 16 * i + lane % 16,
                                                                             2 * k + lane / 16)));
#pragma unroll
            for (int n = 0; n < S_TILES; n += 2) {  // one ldmatrix_x4: keys 8n .. 8n + 15, dims 16k .. 16k + 15
                const int matrix = lane / 8;       // 0: keys +0-7 dims lo, 1: keys +0-7 hi, 2/3: keys +8-15
                unsigned b[4];
                ldmatrix_x4(b, smem_address(k_tile + swizzled<HEAD_DIM>(n * 8 + (matrix / 2) * 8 + lane % 8,
                                                                         2 * k + matrix % 2)));
                const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                for (int i = 0; i < M_TILES; ++i) {  // the same K fragment serves both m16 tiles
                    mma_m16n8k16<T>(s[i][n], q[i], b0);
                    mma_m16n8k16<T>(s[i][n + 1], q[i], b1);
                }
            }
        }

        // Scale to log2 units; on a diagonal tile, mask keys after each row's position.
        const int tile_start = t * KEY_TILE;
        const bool diagonal = tile_start + KEY_TILE - 1 > query_start;
#pragma unroll
        for (int i = 0; i < M_TILES; ++i)
#pragma unroll
            for (int n = 0; n < S_TILES; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[i][n][e] *= scale_log2;
                    if (diagonal && tile_start + n * 8 + 2 * (lane % 4) + e % 2 > position[i][e / 2])
                        s[i][n][e] = negative_infinity();
                }

        // Online softmax: new max per row (over the quad), rescale what was accumulated, exponentiate.
#pragma unroll
        for (int i = 0; i < M_TILES; ++i) {
            float rescale[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float top = m[i][half];
#pragma unroll
                for (int n = 0; n < S_TILES; ++n) top = fmaxf(top, fmaxf(s[i][n][2 * half], s[i][n][2 * half + 1]));
                top = quad_max(top);
                // Tiles run from position 0, whose key every row sees, so top is finite from the first tile on;
                // the guard keeps exp2(-inf - -inf) = NaN out should a row ever see only masked keys.
                const float base = top == negative_infinity() ? 0.0f : top;
                rescale[half] = exp2f(m[i][half] - base);  // 0 on the first tile (m = -inf)
                m[i][half] = top;
                l[i][half] *= rescale[half];
#pragma unroll
                for (int n = 0; n < S_TILES; ++n)
#pragma unroll
                    for (int e = 2 * half; e < 2 * half + 2; ++e) {
                        s[i][n][e] = exp2f(s[i][n][e] - base);  // masked: exp2(-inf) = 0
                        l[i][half] += s[i][n][e];
                    }
            }
#pragma unroll
            for (int d = 0; d < O_TILES; ++d)
                o[i][d][0] *= rescale[0], o[i][d][1] *= rescale[0], o[i][d][2] *= rescale[1], o[i][d][3] *= rescale[1];
        }

        // O += P V: P's A fragments straight from the S accumulators (two n8 tiles are one k16 step).
#pragma unroll
        for (int j = 0; j < KEY_TILE / 16; ++j) {
            unsigned p[M_TILES][4];
#pragma unroll
            for (int i = 0; i < M_TILES; ++i) {
                p[i][0] = pack_pair<T>(s[i][2 * j][0], s[i][2 * j][1]);
                p[i][1] = pack_pair<T>(s[i][2 * j][2], s[i][2 * j][3]);
                p[i][2] = pack_pair<T>(s[i][2 * j + 1][0], s[i][2 * j + 1][1]);
                p[i][3] = pack_pair<T>(s[i][2 * j + 1][2], s[i][2 * j + 1][3]);
            }
#pragma unroll
            for (int d = 0; d < O_TILES; d += 2) {  // one ldmatrix_x4.trans: keys 16j .. 16j + 15, dims 8d .. 8d + 15
                const int matrix = lane / 8;       // 0: keys +0-7 dims lo, 1: keys +8-15 lo, 2/3: the same, dims hi
                unsigned b[4];
                ldmatrix_x4_trans(b, smem_address(v_tile + swizzled<HEAD_DIM>(16 * j + (matrix % 2) * 8 + lane % 8,
                                                                               d + matrix / 2)));
                const unsigned b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
                for (int i = 0; i < M_TILES; ++i) {  // the same V fragment serves both m16 tiles
                    mma_m16n8k16<T>(o[i][d], p[i], b0);
                    mma_m16n8k16<T>(o[i][d + 1], p[i], b1);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before the next iteration's copies refill it
    }
    cp_async_wait<0>();  // no copy may still be landing when the block exits

    // out = O / l, rounded to T; rows past the sequence's rows are skipped.
#pragma unroll
    for (int i = 0; i < M_TILES; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float inverse = 1.0f / quad_sum(l[i][half]);  // all 32 lanes shuffle, before any skips a row
            const int f = first_row + warp_row + 16 * i + lane / 4 + half * 8;
            if (f >= rows) continue;
            T* row = out + (static_cast<size_t>(first_token + f / group) * num_heads + kv_head * group + f % group) *
                               HEAD_DIM;
#pragma unroll
            for (int d = 0; d < O_TILES; ++d)
                *reinterpret_cast<unsigned*>(row + d * 8 + 2 * (lane % 4)) =
                    pack_pair<T>(o[i][d][2 * half] * inverse, o[i][d][2 * half + 1] * inverse);
        }
#endif
}

// ---- the instantiations the launcher uses: fp16 and bf16, head_dim 64 and 128, two tilings -------------------
// (M_TILES, KEY_TILE) = (2, 32) is the one launches use; (1, 64), the first version, is kept for the benchmark's
// version-by-version table.
#define PREFILL_KERNEL(T, D, M, K)                                                                               \
    template __global__ void paged_prefill<T, D, M, K>(T*, const T*, const T*, const T*, const int*, const int*, \
                                                       const int*, int, int, int, int, float);
#define PREFILL_TILINGS(T, D) PREFILL_KERNEL(T, D, 1, 64) PREFILL_KERNEL(T, D, 2, 32)
PREFILL_TILINGS(__half, 64)
PREFILL_TILINGS(__half, 128)
PREFILL_TILINGS(__nv_bfloat16, 64)
PREFILL_TILINGS(__nv_bfloat16, 128)
