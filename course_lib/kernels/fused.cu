// Fused elementwise steps of a Llama layer (the engine, chapter 06 and lab 20).
//
// Written with array operations, rotary embeddings take about six kernels per tensor (split the halves,
// negate, two products, a sum, a cast), the cache write one more, and SwiGLU's activation about six more,
// each reading and writing the whole tensor. At batch 1 every one of them is a launch of a few microseconds
// that moves almost nothing. Each kernel here does one of those steps in a single pass, in fp32, reading
// each input once.

#include "elements.cuh"

// One projection computed q, k and v together: qkv is [tokens, (heads + 2 kv_heads) * head_dim].
// rope_write_kv writes q [tokens, heads, head_dim] rotated by its token's position, and stores the rotated
// k and the unchanged v straight into the paged KV cache [num_blocks, kv_heads, block_size, head_dim] at
// the token's slot (block * block_size + offset; -1 marks padding, whose k and v are dropped). Llama's RoPE
// pairs feature i with i + head_dim / 2 and turns the pair by position * inverse_frequencies[i].
// grid (tokens), any block size: a thread takes pairs (i, i + head_dim / 2) of every head in turn.
template <typename T>
__global__ void rope_write_kv(T* __restrict__ q, T* __restrict__ key_cache, T* __restrict__ value_cache,
                              const T* __restrict__ qkv, const int* __restrict__ positions,
                              const float* __restrict__ inverse_frequencies, const int* __restrict__ slot_mapping,
                              int heads, int kv_heads, int head_dim, int block_size) {
    const int token = blockIdx.x, half = head_dim / 2, all_heads = heads + 2 * kv_heads;
    const int slot = slot_mapping[token];
    const float position = static_cast<float>(positions[token]);
    const T* row = qkv + static_cast<size_t>(token) * all_heads * head_dim;
    // The cache row of kv head h for this token: its block, then the head, then the row in the block.
    auto cache_row = [&](T* cache, int h) {
        return cache + ((static_cast<size_t>(slot / block_size) * kv_heads + h) * block_size + slot % block_size) *
                           head_dim;
    };
    for (int pair = threadIdx.x; pair < all_heads * half; pair += blockDim.x) {
        const int head = pair / half, i = pair % half;
        const T* in = row + head * head_dim;
        if (head >= heads && slot < 0) continue;  // a padding token's k and v are not stored
        if (head >= heads + kv_heads) {  // a value head: copied
            T* out = cache_row(value_cache, head - heads - kv_heads);
            out[i] = in[i], out[i + half] = in[i + half];
            continue;
        }
        float sine, cosine;
        sincosf(position * inverse_frequencies[i], &sine, &cosine);  // the accurate sincos: angles reach 10^4 rad
        const float x1 = to_float(in[i]), x2 = to_float(in[i + half]);
        T* out = head < heads ? q + (static_cast<size_t>(token) * heads + head) * head_dim
                              : cache_row(key_cache, head - heads);
        out[i] = from_float<T>(x1 * cosine - x2 * sine);
        out[i + half] = from_float<T>(x2 * cosine + x1 * sine);
    }
}

// One projection computed gate and up together: gate_up is [tokens, 2 * inner], gate first.
// out [tokens, inner] = silu(gate) * up, silu(g) = g / (1 + exp(-g)). A grid-stride loop over out.
template <typename T>
__global__ void silu_mul(T* __restrict__ out, const T* __restrict__ gate_up, int tokens, int inner) {
    const size_t total = static_cast<size_t>(tokens) * inner;
    for (size_t index = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; index < total;
         index += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const size_t token = index / inner, j = index % inner;
        const float gate = to_float(gate_up[token * 2 * inner + j]), up = to_float(gate_up[token * 2 * inner + inner + j]);
        out[index] = from_float<T>(gate / (1.0f + expf(-gate)) * up);
    }
}

#define FUSED_KERNELS(T)                                                                                     \
    template __global__ void rope_write_kv<T>(T*, T*, T*, const T*, const int*, const float*, const int*, int,  \
                                              int, int, int);                                                \
    template __global__ void silu_mul<T>(T*, const T*, int, int);

FUSED_KERNELS(float)
FUSED_KERNELS(__half)
FUSED_KERNELS(__nv_bfloat16)
