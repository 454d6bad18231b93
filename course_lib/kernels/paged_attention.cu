// Decode attention over a paged KV cache (chapter 04), and the kernel that writes new K/V into it.
//
// The cache is a pool of fixed-size blocks: key_cache and value_cache are
// [num_blocks, num_kv_heads, BLOCK_SIZE, HEAD_DIM], so one (block, kv head) is a contiguous
// BLOCK_SIZE x HEAD_DIM tile. A sequence's tokens live in the blocks its row of block_tables names,
// in order: token t is row t % BLOCK_SIZE of block block_tables[seq][t / BLOCK_SIZE].
//
// One kernel serves both versions of the course:
//   * v1: one thread block per (sequence, query head) walks the whole context;
//   * v2 (flash-decoding): the context is cut into partitions of `partition_size` tokens, one
//     thread block per (sequence, partition, group of query heads sharing a KV head), and a second
//     kernel merges the partitions' partial results with their log-sum-exp. Long contexts then
//     spread over many SMs, and with GQA each K/V tile is read once for all the heads that use it.
// Inside a block every warp walks its own tiles of TILE tokens (warp w takes tiles w, w + WARPS, ...)
// through a private ring of STAGES tiles in shared memory: cp.async copies the K and V rows of the
// next STAGES - 1 tiles while the warp computes on the current one, so many bytes are in flight
// without holding them in registers (the one thing a memory-bound kernel needs), and no warp ever
// waits for another inside the loop: there is no block barrier until the end.
// Computing on a tile, a token row of HEAD_DIM values is split over GROUP = HEAD_DIM / PACK lanes,
// PACK values (16 bytes of fp16/bf16) each, so a dot product needs a log2(GROUP)-step shuffle and
// a warp works on 32 / GROUP rows at once. Each lane group keeps its own "online" softmax over the
// rows it sees: a running maximum m, a running sum l of exp(logit - m) and an accumulator of
// exp(logit - m) * v, rescaled by exp(old m - new m) once per tile. At the end the groups' and then
// the warps' states are merged with the same log-sum-exp rule v2 uses between partitions. No logit
// array the size of the context is ever needed, and every exponent is of a number <= 0 (no overflow).
// The host checks every block-table entry and context length before a launch (paged_attention.py).

#include "elements.cuh"
#include "tensor_core.cuh"

namespace paged {
// The launcher (paged_attention.py) sizes the dynamic shared memory from THREADS, TILE and STAGES.
constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int TILE = 8;     // tokens per stage of a warp's ring
constexpr int STAGES = 2;   // tiles of a warp's ring: one computed on while the next is copied
constexpr int PACK = 8;     // values a lane owns of each row: 16 bytes of fp16/bf16 (32 of fp32)

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// Sum over the GROUP lanes that share a token row.
template <int GROUP>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int offset = GROUP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// exp(x - top) with top = -inf read as 0: a state that has seen no token yet (m = -inf) rescales to 0
// and a masked token (logit -inf) weighs 0, instead of exp(-inf + inf) = NaN.
__device__ __forceinline__ float exp_below(float x, float top) {
    return __expf(x - (top == negative_infinity() ? 0.0f : top));
}

// ---- copies into the ring: cp.async from sm_80, through registers before ------------------------------
__device__ __forceinline__ void copy_16(void* dst, const void* src, bool inside) {
#if __CUDA_ARCH__ >= 800
    cp_async_16(smem_address(dst), src, inside);  // zero-fills when !inside
#else
    *static_cast<uint4*>(dst) = inside ? *static_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void commit_copies() {
#if __CUDA_ARCH__ >= 800
    cp_async_commit();
#endif
}
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
#if __CUDA_ARCH__ >= 800
    cp_async_wait<PENDING>();
#endif
    __syncwarp();  // every lane's copies are visible to the whole warp
}

// One warp copies the K and V rows of tokens [first, first + TILE) into a stage of its ring
// ([TILE][HEAD_DIM] each), 16 bytes per lane per copy; rows at or past `end` are zero-filled.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void load_tile(T* keys, T* values, const T* key_cache, const T* value_cache,
                                          const int* table, int first, int end, int kv_head, int num_kv_heads) {
    constexpr int ROW_CHUNKS = HEAD_DIM * sizeof(T) / 16, CHUNK_VALUES = 16 / sizeof(T);
#pragma unroll
    for (int c = threadIdx.x % 32; c < TILE * ROW_CHUNKS; c += 32) {
        const int token = first + c / ROW_CHUNKS;
        const bool inside = token < end;
        const size_t offset = inside ? ((static_cast<size_t>(table[token / BLOCK_SIZE]) * num_kv_heads + kv_head) *
                                            BLOCK_SIZE + token % BLOCK_SIZE) * HEAD_DIM + (c % ROW_CHUNKS) * CHUNK_VALUES
                                     : 0;
        copy_16(keys + c * CHUNK_VALUES, key_cache + offset, inside);
        copy_16(values + c * CHUNK_VALUES, value_cache + offset, inside);
    }
}

// The running softmax of some tokens for one query head: max logit, sum of exp(logit - max), and
// the accumulator sum of exp(logit - max) * v over the lane's PACK dimensions of the head.
struct Running {
    float max, sum, acc[PACK];
};

// Fold `other` into `state`: both are rescaled to the larger maximum, then added.
__device__ __forceinline__ void merge(Running& state, float other_max, float other_sum, const float (&other_acc)[PACK]) {
    const float top = fmaxf(state.max, other_max);
    const float mine = exp_below(state.max, top), theirs = exp_below(other_max, top);
    state.sum = state.sum * mine + other_sum * theirs;
#pragma unroll
    for (int j = 0; j < PACK; ++j) state.acc[j] = state.acc[j] * mine + other_acc[j] * theirs;
    state.max = top;
}

// One lane group's online-softmax step over the tile rows it owns (slot, slot + ROWS, ...) for HEADS
// query heads at once: every K and V value read from shared memory serves all HEADS heads. First the
// logits of all its rows, then one rescale per head, then the weighted values.
template <typename T, int HEAD_DIM, int HEADS>
__device__ __forceinline__ void attend_tile(Running (&state)[HEADS], const float (&q)[HEADS][PACK], const T* keys,
                                            const T* values, int first, int end) {
    constexpr int GROUP = HEAD_DIM / PACK, ROWS = 32 / GROUP, OWNED = TILE / ROWS;
    const int slot = threadIdx.x % 32 / GROUP, piece = threadIdx.x % GROUP;
    float logits[OWNED][HEADS];
#pragma unroll
    for (int o = 0; o < OWNED; ++o) {
        const int r = slot + o * ROWS;
        float k[PACK];
        load_floats<T, PACK>(keys + r * HEAD_DIM, piece, k);
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < PACK; ++j) dot += q[h][j] * k[j];
            const float logit = group_sum<GROUP>(dot);  // every lane shuffles, masked rows too: a
            logits[o][h] = first + r < end ? logit : negative_infinity();  // sync shuffle needs all 32
        }
    }
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
        float top = state[h].max;
#pragma unroll
        for (int o = 0; o < OWNED; ++o) top = fmaxf(top, logits[o][h]);
        const float rescale = exp_below(state[h].max, top);  // 0 while nothing was seen (max -inf)
        state[h].sum *= rescale;
#pragma unroll
        for (int j = 0; j < PACK; ++j) state[h].acc[j] *= rescale;
#pragma unroll
        for (int o = 0; o < OWNED; ++o) logits[o][h] = exp_below(logits[o][h], top), state[h].sum += logits[o][h];
        state[h].max = top;
    }
#pragma unroll
    for (int o = 0; o < OWNED; ++o) {
        float v[PACK];
        load_floats<T, PACK>(values + (slot + o * ROWS) * HEAD_DIM, piece, v);
#pragma unroll
        for (int h = 0; h < HEADS; ++h)
#pragma unroll
            for (int j = 0; j < PACK; ++j) state[h].acc[j] += logits[o][h] * v[j];
    }
}
}  // namespace paged

// ---- decode attention: v1 (PARTIAL = false, one partition) and v2's partition step ------------------
// grid (partitions, num_heads / HEADS, num_seqs), THREADS threads, dynamic shared memory for the warps'
// rings (WARPS * STAGES * 2 * TILE * HEAD_DIM elements). A block handles HEADS query heads, all mapped
// to one KV head, over tokens [partition * partition_size, ... + partition_size).
// v1 writes out [num_seqs, num_heads, HEAD_DIM]; v2 writes each partition's unnormalised output,
// running max and sum to partial_* [num_seqs, num_heads, max_partitions(, HEAD_DIM)].
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int HEADS, bool PARTIAL>
__global__ void __launch_bounds__(paged::THREADS)
    paged_attention(T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_max,
                    float* __restrict__ partial_sum, const T* __restrict__ query, const T* __restrict__ key_cache,
                    const T* __restrict__ value_cache, const int* __restrict__ block_tables,
                    const int* __restrict__ context_lens, int num_heads, int num_kv_heads, int max_blocks,
                    int partition_size, float scale) {
    using namespace paged;
    constexpr int GROUP = HEAD_DIM / PACK;  // lanes that share a token row, PACK values each
    static_assert(HEAD_DIM % PACK == 0 && 32 % GROUP == 0 && TILE % (32 / GROUP) == 0, "rows split over lanes");
    extern __shared__ __align__(16) unsigned char rings[];
    __shared__ float warp_max[WARPS][HEADS], warp_sum[WARPS][HEADS], warp_acc[WARPS][HEADS][HEAD_DIM];

    const int seq = blockIdx.z, head0 = blockIdx.y * HEADS, partition = blockIdx.x;
    const int kv_head = head0 / (num_heads / num_kv_heads);
    const int context = context_lens[seq], start = partition * partition_size;
    if (start >= context) return;  // a partition past this sequence's end: the merge skips it
    const int end = min(context, start + partition_size);
    const int* table = block_tables + static_cast<size_t>(seq) * max_blocks;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, piece = lane % GROUP;
    T* ring = reinterpret_cast<T*>(rings) + static_cast<size_t>(warp) * STAGES * 2 * TILE * HEAD_DIM;
    auto keys = [&](int stage) { return ring + stage * 2 * TILE * HEAD_DIM; };
    auto values = [&](int stage) { return ring + (stage * 2 + 1) * TILE * HEAD_DIM; };

    // This warp's tiles start at start + (warp + i * WARPS) * TILE, i < count.
    const int tiles = (end - start + TILE - 1) / TILE, count = tiles > warp ? (tiles - warp + WARPS - 1) / WARPS : 0;
    auto first_token = [&](int i) { return start + (warp + i * WARPS) * TILE; };
    auto load = [&](int i) {  // start copying tile i into stage i % STAGES (an empty group past the end)
        if (i < count) load_tile<T, HEAD_DIM, BLOCK_SIZE>(keys(i % STAGES), values(i % STAGES), key_cache, value_cache,
                                                          table, first_token(i), end, kv_head, num_kv_heads);
        commit_copies();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) load(i);

    float q[HEADS][PACK];
    Running state[HEADS];
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
        load_floats<T, PACK>(query + (static_cast<size_t>(seq) * num_heads + head0 + h) * HEAD_DIM, piece, q[h]);
        state[h].max = negative_infinity(), state[h].sum = 0.0f;
#pragma unroll
        for (int j = 0; j < PACK; ++j) q[h][j] *= scale, state[h].acc[j] = 0.0f;
    }

    for (int i = 0; i < count; ++i) {
        load(i + STAGES - 1);         // refills the stage tile i - 1 used (the warp is done with it)
        wait_copies<STAGES - 1>();    // tile i has landed
        attend_tile<T, HEAD_DIM, HEADS>(state, q, keys(i % STAGES), values(i % STAGES), first_token(i), end);
        __syncwarp();                 // every lane is done reading stage i % STAGES before it is refilled
    }

    // Merge the warp's lane groups (shuffles), then the block's warps (shared memory).
#pragma unroll
    for (int h = 0; h < HEADS; ++h)
#pragma unroll
        for (int offset = GROUP; offset < 32; offset *= 2) {
            float other_acc[PACK];
#pragma unroll
            for (int j = 0; j < PACK; ++j) other_acc[j] = __shfl_xor_sync(0xffffffffu, state[h].acc[j], offset);
            const float other_max = __shfl_xor_sync(0xffffffffu, state[h].max, offset);
            merge(state[h], other_max, __shfl_xor_sync(0xffffffffu, state[h].sum, offset), other_acc);
        }
    if (lane < GROUP) {
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
            warp_max[warp][h] = state[h].max, warp_sum[warp][h] = state[h].sum;
#pragma unroll
            for (int j = 0; j < PACK; ++j) warp_acc[warp][h][piece * PACK + j] = state[h].acc[j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < HEADS * HEAD_DIM; i += THREADS) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        float top = negative_infinity();
#pragma unroll
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, warp_max[w][h]);
        float sum = 0.0f, value = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float weight = exp_below(warp_max[w][h], top);  // a warp that saw no token weighs 0
            sum += warp_sum[w][h] * weight, value += warp_acc[w][h][d] * weight;
        }
        const size_t head = static_cast<size_t>(seq) * num_heads + head0 + h;
        if constexpr (PARTIAL) {
            const int partitions = gridDim.x;
            partial_out[(head * partitions + partition) * HEAD_DIM + d] = value;
            if (d == 0) partial_max[head * partitions + partition] = top, partial_sum[head * partitions + partition] = sum;
        } else {
            out[head * HEAD_DIM + d] = from_float<T>(value / sum);
        }
    }
}

// ---- v2's second step: merge the partitions with their log-sum-exp ----------------------------------
// grid (num_heads, num_seqs), HEAD_DIM threads. With M the largest partition max, every partition's
// sum and output are scaled by exp(max_p - M) before they are added; out = sum of outputs / sum of sums.
template <typename T, int HEAD_DIM>
__global__ void paged_attention_merge(T* __restrict__ out, const float* __restrict__ partial_out,
                                      const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                                      const int* __restrict__ context_lens, int num_heads, int partitions,
                                      int partition_size) {
    const int seq = blockIdx.y, d = threadIdx.x;
    const size_t head = static_cast<size_t>(seq) * num_heads + blockIdx.x;
    const int used = (context_lens[seq] + partition_size - 1) / partition_size;
    float top = paged::negative_infinity();
    for (int p = 0; p < used; ++p) top = fmaxf(top, partial_max[head * partitions + p]);
    float sum = 0.0f, value = 0.0f;
    for (int p = 0; p < used; ++p) {
        const float weight = __expf(partial_max[head * partitions + p] - top);
        sum += partial_sum[head * partitions + p] * weight;
        value += partial_out[(head * partitions + p) * HEAD_DIM + d] * weight;
    }
    out[head * HEAD_DIM + d] = from_float<T>(value / sum);
}

// ---- new tokens into the cache: slot = block * block_size + row; slot < 0 is padding ----------------
// grid (num_tokens), up to num_kv_heads * HEAD_DIM / PACK threads (a pack of PACK values of K and of V each).
template <typename T, int HEAD_DIM>
__global__ void write_kv(T* __restrict__ key_cache, T* __restrict__ value_cache, const T* __restrict__ key,
                         const T* __restrict__ value, const int* __restrict__ slot_mapping, int num_kv_heads,
                         int block_size) {
    constexpr int PACKS = HEAD_DIM / paged::PACK;
    const int slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const size_t block = slot / block_size, row = slot % block_size;
    for (int i = threadIdx.x; i < num_kv_heads * PACKS; i += blockDim.x) {
        const int head = i / PACKS, pack = i % PACKS;
        const size_t src = (static_cast<size_t>(blockIdx.x) * num_kv_heads + head) * HEAD_DIM;
        const size_t dst = ((block * num_kv_heads + head) * block_size + row) * HEAD_DIM;
        using P = Pack<T, paged::PACK>;
        reinterpret_cast<P*>(key_cache + dst)[pack] = reinterpret_cast<const P*>(key + src)[pack];
        reinterpret_cast<P*>(value_cache + dst)[pack] = reinterpret_cast<const P*>(value + src)[pack];
    }
}

// ---- the instantiations the launcher uses -----------------------------------------------------------
// fp32 (the tests' exact type), fp16, bf16; head_dim 64 and 128; block sizes 8, 16, 32; v1 (1 head a block),
// v2 with 1 or 4 heads a block (4 when query heads come in groups of 4 per KV head, as Llama's 32:8).
#define PAGED_KERNELS(T, D, B)                                                                                    \
    template __global__ void paged_attention<T, D, B, 1, false>(T*, float*, float*, float*, const T*, const T*,  \
                                                                const T*, const int*, const int*, int, int, int, \
                                                                int, float);                                      \
    template __global__ void paged_attention<T, D, B, 1, true>(T*, float*, float*, float*, const T*, const T*,   \
                                                               const T*, const int*, const int*, int, int, int,  \
                                                               int, float);                                       \
    template __global__ void paged_attention<T, D, B, 4, true>(T*, float*, float*, float*, const T*, const T*,   \
                                                               const T*, const int*, const int*, int, int, int,  \
                                                               int, float);
#define PAGED_TYPE(T, D)                                                                                           \
    PAGED_KERNELS(T, D, 8)                                                                                         \
    PAGED_KERNELS(T, D, 16)                                                                                        \
    PAGED_KERNELS(T, D, 32)                                                                                        \
    template __global__ void paged_attention_merge<T, D>(T*, const float*, const float*, const float*, const int*, \
                                                         int, int, int);                                           \
    template __global__ void write_kv<T, D>(T*, T*, const T*, const T*, const int*, int, int);

PAGED_TYPE(float, 64)
PAGED_TYPE(float, 128)
PAGED_TYPE(__half, 64)
PAGED_TYPE(__half, 128)
PAGED_TYPE(__nv_bfloat16, 64)
PAGED_TYPE(__nv_bfloat16, 128)
