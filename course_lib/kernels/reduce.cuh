// Sums across a warp and across a thread block, shared by the course's kernels that reduce a row.
#pragma once

// Each warp adds its 32 values with shuffles: no shared memory, no barrier. Every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// N block-wide sums at once: every thread gets the N totals. Warps add their lanes' values with shuffles,
// leave one partial sum each in shared memory, and every warp then adds those partials itself: one barrier
// between the two halves, instead of a second one to broadcast a result. The block must be whole warps.
template <int N>
__device__ __forceinline__ void block_sums(float (&v)[N]) {
    __shared__ float per_warp[N][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        v[i] = warp_sum(v[i]);
        if (lane == 0) per_warp[i][warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? per_warp[i][lane] : 0.0f);
    __syncthreads();  // per_warp may be written again by the next call
}

__device__ __forceinline__ float block_sum(float v) {
    float sums[1] = {v};
    block_sums<1>(sums);
    return sums[0];
}
