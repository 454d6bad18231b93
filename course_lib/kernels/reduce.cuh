// Sums across a warp and across a thread block, and the scaling an RMSNorm applies once it has its row's
// sum: shared by the course's kernels that normalise a row (norm.cu, matvec.cu).
#pragma once

#include "elements.cuh"

// Each warp adds its 32 values with shuffles: no shared memory, no barrier. Every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The block-wide sum, handed to every thread. Warps add their lanes' values with shuffles and leave one
// partial sum each in shared memory; every warp then adds those partials itself: one barrier between the two
// halves, instead of a second one to broadcast a result. The block must be whole warps (the shuffles need
// every lane of a warp).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float per_warp[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) per_warp[warp] = v;
    __syncthreads();
    v = warp_sum(lane < warps ? per_warp[lane] : 0.0f);
    __syncthreads();  // per_warp may be written again by the next call
    return v;
}

// out_row = row * inv_rms * w, pack by pack, each thread taking packs threadIdx.x, + blockDim.x, ...: the
// values are read again from `row` (in place when out_row == row: each thread rewrites only its own packs).
template <typename T, int PACK>
__device__ __forceinline__ void reload_scale_and_store(T* out_row, const T* row, const T* w, float inv_rms,
                                                       int packs) {
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[PACK], weight[PACK];
        load_floats<T, PACK>(row, p, v);
        load_floats<T, PACK>(w, p, weight);
#pragma unroll
        for (int j = 0; j < PACK; ++j) v[j] = v[j] * inv_rms * weight[j];
        store_floats<T, PACK>(out_row, p, v);
    }
}
