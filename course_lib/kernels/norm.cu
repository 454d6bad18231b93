// RMSNorm, fused residual-add + RMSNorm, and LayerNorm: the normalisations of every transformer layer.
//
// All three are memory-bound: each element is read once and written once, with a handful of
// operations in between, so the goal is to move bytes at the speed of a plain copy. The recipe:
//   * one thread block per row, so a row's reduction stays inside one block;
//   * 16-byte loads and stores (8 bf16/fp16 or 4 fp32 values per instruction), coalesced;
//   * the row held in registers between the reduction and the write (ITEMS packs per thread),
//     so x is read from memory exactly once;
//   * fp32 accumulation whatever the storage type;
//   * for rows too long to hold in registers, a "long row" variant that reads the row twice
//     (the second read mostly hits L2) and, with PACK = 1, handles any length and alignment.

#include "reduce.cuh"

// ---- a row into registers: ITEMS packs per thread, zeros past the end of the row -------------------
template <typename T, int ITEMS, int PACK>
__device__ __forceinline__ void load_row(const T* row, float (&v)[ITEMS][PACK], int packs) {
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int p = threadIdx.x + it * blockDim.x;
        if (p < packs) {
            load_floats<T, PACK>(row, p, v[it]);
        } else {
#pragma unroll
            for (int j = 0; j < PACK; ++j) v[it][j] = 0.0f;
        }
    }
}

// ---- the last step of both RMSNorm kernels: out = v * inv_rms * w, with w already in registers ----------
// The kernels load w together with the row, before the reduction's barriers. At batch 1 a norm is one
// block and its time is a chain of memory latencies; loading w after the reduction would add one more.
template <typename T, int ITEMS, int PACK>
__device__ __forceinline__ void scale_and_store(T* out_row, const float (&weight)[ITEMS][PACK],
                                                float (&v)[ITEMS][PACK], float inv_rms, int packs) {
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int p = threadIdx.x + it * blockDim.x;
        if (p < packs) {
#pragma unroll
            for (int j = 0; j < PACK; ++j) v[it][j] = v[it][j] * inv_rms * weight[it][j];
            store_floats<T, PACK>(out_row, p, v[it]);
        }
    }
}

// ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w ----------------------------------------------
template <typename T, int ITEMS>
__global__ void rms_norm_rows(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                              float eps, int hidden) {
    constexpr int PACK = 16 / sizeof(T);
    const int packs = hidden / PACK;
    const size_t row = blockIdx.x;
    float v[ITEMS][PACK], weight[ITEMS][PACK];
    load_row<T, ITEMS, PACK>(x + row * hidden, v, packs);
    load_row<T, ITEMS, PACK>(w, weight, packs);
    float sum_sq = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
        for (int j = 0; j < PACK; ++j) sum_sq += v[it][j] * v[it][j];
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / hidden + eps);
    scale_and_store<T, ITEMS, PACK>(out + row * hidden, weight, v, inv_rms, packs);
}

template <typename T, int PACK>
__global__ void rms_norm_long(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                              float eps, int hidden) {
    const int packs = hidden / PACK;
    const T* x_row = x + static_cast<size_t>(blockIdx.x) * hidden;
    float sum_sq = 0.0f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK];
        load_floats<T, PACK>(x_row, p, v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) sum_sq += v[j] * v[j];
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / hidden + eps);
    reload_scale_and_store<T, PACK>(out + static_cast<size_t>(blockIdx.x) * hidden, x_row, w, inv_rms, packs);
}

// ---- fused residual add + RMSNorm, as Llama-style blocks run it --------------------------------
// residual <- x + residual (stored back, rounded to T); out <- RMSNorm(x + residual) * w.
// One pass over four arrays instead of an add kernel and a norm kernel (six array passes).
template <typename T, int ITEMS>
__global__ void add_rms_norm_rows(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                  const T* __restrict__ w, float eps, int hidden) {
    constexpr int PACK = 16 / sizeof(T);
    const int packs = hidden / PACK;
    const size_t row = blockIdx.x;
    float v[ITEMS][PACK], weight[ITEMS][PACK];
    load_row<T, ITEMS, PACK>(w, weight, packs);
    float sum_sq = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int p = threadIdx.x + it * blockDim.x;
        if (p < packs) {
            float r[PACK];
            load_floats<T, PACK>(x + row * hidden, p, v[it]);
            load_floats<T, PACK>(residual + row * hidden, p, r);
#pragma unroll
            for (int j = 0; j < PACK; ++j) {
                v[it][j] += r[j];
                sum_sq += v[it][j] * v[it][j];
            }
            store_floats<T, PACK>(residual + row * hidden, p, v[it]);
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / hidden + eps);
    scale_and_store<T, ITEMS, PACK>(out + row * hidden, weight, v, inv_rms, packs);
}

template <typename T, int PACK>
__global__ void add_rms_norm_long(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                  const T* __restrict__ w, float eps, int hidden) {
    const int packs = hidden / PACK;
    const size_t offset = static_cast<size_t>(blockIdx.x) * hidden;
    float sum_sq = 0.0f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK], r[PACK];
        load_floats<T, PACK>(x + offset, p, v);
        load_floats<T, PACK>(residual + offset, p, r);
#pragma unroll
        for (int j = 0; j < PACK; ++j) {
            v[j] += r[j];
            sum_sq += v[j] * v[j];
        }
        store_floats<T, PACK>(residual + offset, p, v);
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / hidden + eps);
    // Each thread reads back the packs it wrote itself: no barrier needed.
    reload_scale_and_store<T, PACK>(out + offset, residual + offset, w, inv_rms, packs);
}

// ---- LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b ----------------------------------------
// The variance is the mean of (x - mean)^2 over the values in registers: two reductions, but no
// cancellation of the kind E[x^2] - E[x]^2 suffers when the mean is large.
template <typename T, int ITEMS>
__global__ void layer_norm_rows(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, float eps, int hidden) {
    constexpr int PACK = 16 / sizeof(T);
    const int packs = hidden / PACK;
    const size_t row = blockIdx.x;
    float v[ITEMS][PACK];
    load_row<T, ITEMS, PACK>(x + row * hidden, v, packs);
    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
        for (int j = 0; j < PACK; ++j) sum += v[it][j];
    }
    const float mean = block_sum(sum) / hidden;
    float sum_sq = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        if (threadIdx.x + it * blockDim.x < packs) {
#pragma unroll
            for (int j = 0; j < PACK; ++j) sum_sq += (v[it][j] - mean) * (v[it][j] - mean);
        }
    }
    const float inv_std = rsqrtf(block_sum(sum_sq) / hidden + eps);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const int p = threadIdx.x + it * blockDim.x;
        if (p < packs) {
            float weight[PACK], bias[PACK];
            load_floats<T, PACK>(w, p, weight);
            load_floats<T, PACK>(b, p, bias);
#pragma unroll
            for (int j = 0; j < PACK; ++j) v[it][j] = (v[it][j] - mean) * inv_std * weight[j] + bias[j];
            store_floats<T, PACK>(out + row * hidden, p, v[it]);
        }
    }
}

template <typename T, int PACK>
__global__ void layer_norm_long(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, float eps, int hidden) {
    const int packs = hidden / PACK;
    const T* x_row = x + static_cast<size_t>(blockIdx.x) * hidden;
    float sum = 0.0f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK];
        load_floats<T, PACK>(x_row, p, v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) sum += v[j];
    }
    const float mean = block_sum(sum) / hidden;
    float sum_sq = 0.0f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK];
        load_floats<T, PACK>(x_row, p, v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) sum_sq += (v[j] - mean) * (v[j] - mean);
    }
    const float inv_std = rsqrtf(block_sum(sum_sq) / hidden + eps);
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK], weight[PACK], bias[PACK];
        load_floats<T, PACK>(x_row, p, v);
        load_floats<T, PACK>(w, p, weight);
        load_floats<T, PACK>(b, p, bias);
#pragma unroll
        for (int j = 0; j < PACK; ++j) v[j] = (v[j] - mean) * inv_std * weight[j] + bias[j];
        store_floats<T, PACK>(out + static_cast<size_t>(blockIdx.x) * hidden, p, v);
    }
}

// ---- the instantiations the launchers use (and the compile checks report) -------------------
#define NORM_ROWS(T, ITEMS)                                                                              \
    template __global__ void rms_norm_rows<T, ITEMS>(T*, const T*, const T*, float, int);               \
    template __global__ void add_rms_norm_rows<T, ITEMS>(T*, T*, const T*, const T*, float, int);       \
    template __global__ void layer_norm_rows<T, ITEMS>(T*, const T*, const T*, const T*, float, int);
#define NORM_LONG(T, PACK)                                                                               \
    template __global__ void rms_norm_long<T, PACK>(T*, const T*, const T*, float, int);                \
    template __global__ void add_rms_norm_long<T, PACK>(T*, T*, const T*, const T*, float, int);        \
    template __global__ void layer_norm_long<T, PACK>(T*, const T*, const T*, const T*, float, int);
#define NORM_KERNELS(T)                                                                                  \
    NORM_ROWS(T, 1) NORM_ROWS(T, 2) NORM_ROWS(T, 4) NORM_ROWS(T, 8)                                      \
    NORM_LONG(T, 16 / sizeof(T)) NORM_LONG(T, 1)

NORM_KERNELS(float)
NORM_KERNELS(__half)
NORM_KERNELS(__nv_bfloat16)
