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
// Inside a block the softmax is "online": tokens go in chunks of CHUNK; for each chunk the block
// computes the logits, raises the running maximum, rescales what it has accumulated so far by
// exp(old max - new max), and adds the chunk's weighted values. No logit array the size of the
// context is ever needed, and every exponent is of a number <= 0 (no overflow).
// The host checks every block-table entry and context length before a launch (paged_attention.py).

#include "elements.cuh"

namespace paged {
constexpr int THREADS = 128;
constexpr int PACK = 8;    // values one thread loads at a time: 16 bytes of fp16/bf16 (32 of fp32)
constexpr int CHUNK = 64;  // tokens per step of the online softmax

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// Sum over the `width` consecutive lanes that share one token row (width a power of two <= 32).
template <int WIDTH>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return row_sum<32>(v); }

// Where token `token` of a sequence keeps its row for one KV head.
template <int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ size_t row_offset(const int* table, int token, int kv_head, int num_kv_heads) {
    const int block = table[token / BLOCK_SIZE];
    return ((static_cast<size_t>(block) * num_kv_heads + kv_head) * BLOCK_SIZE + token % BLOCK_SIZE) * HEAD_DIM;
}
}  // namespace paged

// ---- decode attention: v1 (PARTIAL = false, one partition) and v2's partition step ------------------
// grid (partitions, num_heads / HEADS, num_seqs), THREADS threads. A block handles HEADS query heads,
// all mapped to one KV head, over tokens [partition * partition_size, ... + partition_size).
// Threads: HEAD_DIM / PACK lanes hold one token row (PACK values each), THREADS / that many rows at once.
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
    constexpr int LANES = HEAD_DIM / PACK, ROWS = THREADS / LANES;
    static_assert(LANES <= 32 && THREADS % LANES == 0, "a token row must fit in one warp");
    __shared__ float weights[HEADS][CHUNK];  // logits, then exp(logit - running max)
    __shared__ float running_max[HEADS], running_sum[HEADS], rescale[HEADS];
    __shared__ float total[HEADS][HEAD_DIM];

    const int seq = blockIdx.z, head0 = blockIdx.y * HEADS, partition = blockIdx.x;
    const int kv_head = head0 / (num_heads / num_kv_heads);
    const int context = context_lens[seq], start = partition * partition_size;
    if (start >= context) return;  // a partition past this sequence's end: the merge skips it
    const int end = min(context, start + partition_size);
    const int* table = block_tables + static_cast<size_t>(seq) * max_blocks;
    const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;

    float q[HEADS][PACK], acc[HEADS][PACK];
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
        load_floats<T, PACK>(query + (static_cast<size_t>(seq) * num_heads + head0 + h) * HEAD_DIM, lane, q[h]);
#pragma unroll
        for (int j = 0; j < PACK; ++j) q[h][j] *= scale, acc[h][j] = 0.0f;
    }
    for (int i = threadIdx.x; i < HEADS * HEAD_DIM; i += THREADS) total[i / HEAD_DIM][i % HEAD_DIM] = 0.0f;
    if (threadIdx.x < HEADS) running_max[threadIdx.x] = negative_infinity(), running_sum[threadIdx.x] = 0.0f;

    for (int chunk = start; chunk < end; chunk += CHUNK) {
        // 1. logits of the chunk: each row of lanes takes a token, each lane PACK of its dimensions.
        for (int t = row; t < CHUNK; t += ROWS) {
            const int token = chunk + t;
            float k[PACK] = {};
            if (token < end) load_floats<T, PACK>(key_cache + row_offset<HEAD_DIM, BLOCK_SIZE>(table, token, kv_head,
                                                                                               num_kv_heads), lane, k);
#pragma unroll
            for (int h = 0; h < HEADS; ++h) {
                float dot = 0.0f;
#pragma unroll
                for (int j = 0; j < PACK; ++j) dot += q[h][j] * k[j];
                dot = row_sum<LANES>(dot);
                if (lane == 0) weights[h][t] = token < end ? dot : negative_infinity();
            }
        }
        __syncthreads();
        // 2. online softmax, one warp per head: new max, weights exp(logit - max), rescale of the past.
        for (int h = threadIdx.x / 32; h < HEADS; h += THREADS / 32) {
            const int l = threadIdx.x % 32;
            const float chunk_max = warp_max(fmaxf(weights[h][l], weights[h][l + 32]));
            const float new_max = fmaxf(running_max[h], chunk_max);
            const float w0 = __expf(weights[h][l] - new_max), w1 = __expf(weights[h][l + 32] - new_max);
            weights[h][l] = w0, weights[h][l + 32] = w1;
            const float chunk_sum = warp_sum(w0 + w1);
            if (l == 0) {
                rescale[h] = __expf(running_max[h] - new_max);  // 0 for the first chunk (max was -inf)
                running_sum[h] = running_sum[h] * rescale[h] + chunk_sum;
                running_max[h] = new_max;
            }
        }
        __syncthreads();
        // 3. values: acc = acc * rescale + sum of weight * v over the chunk (rows past the end are skipped).
#pragma unroll
        for (int h = 0; h < HEADS; ++h)
#pragma unroll
            for (int j = 0; j < PACK; ++j) acc[h][j] *= rescale[h];
        for (int t = row; t < CHUNK && chunk + t < end; t += ROWS) {
            float v[PACK];
            load_floats<T, PACK>(value_cache + row_offset<HEAD_DIM, BLOCK_SIZE>(table, chunk + t, kv_head, num_kv_heads),
                                 lane, v);
#pragma unroll
            for (int h = 0; h < HEADS; ++h)
#pragma unroll
                for (int j = 0; j < PACK; ++j) acc[h][j] += weights[h][t] * v[j];
        }
        __syncthreads();  // the next chunk overwrites weights
    }
    // The rows' accumulators hold different tokens of the same dimensions: add them up.
#pragma unroll
    for (int h = 0; h < HEADS; ++h)
#pragma unroll
        for (int j = 0; j < PACK; ++j) atomicAdd(&total[h][lane * PACK + j], acc[h][j]);
    __syncthreads();
    for (int i = threadIdx.x; i < HEADS * HEAD_DIM; i += THREADS) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        const size_t head = static_cast<size_t>(seq) * num_heads + head0 + h;
        if constexpr (PARTIAL) {
            const int partitions = gridDim.x;
            partial_out[(head * partitions + partition) * HEAD_DIM + d] = total[h][d];
            if (d == 0) partial_max[head * partitions + partition] = running_max[h];
            if (d == 0) partial_sum[head * partitions + partition] = running_sum[h];
        } else {
            out[head * HEAD_DIM + d] = from_float<T>(total[h][d] / running_sum[h]);
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
