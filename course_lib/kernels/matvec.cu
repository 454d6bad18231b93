// Matrix-vector products for one-token steps, with the small steps around them fused in.
//
// When a step decodes one token, every projection of a layer is a matrix-vector product y = W x: each
// weight is read once for one multiply-add, so the product runs at the speed of memory, and cuBLAS comes
// close to it. What a library call cannot do is the work around the product. A Llama layer also runs two
// RMSNorms, a SwiGLU activation and two residual adds: at one token each is a kernel that moves a few
// kilobytes and costs a launch and a chain of memory latencies, about 2-3 us. Here they ride on the products:
//   * RMS_NORM: y = W rmsnorm(x). The norm needs sum(x^2) over the whole row: every block computes it for
//     itself (x is a few kilobytes, in L2), while its first weights are on their way;
//   * SILU_MUL: y = W (silu(gate) * up), reading the stacked gate/up projection [2k]: elementwise, per pack;
//   * PLAIN:    y = W x.
// With ADD, the product is added to y in place: the residual stream, y += W x.
// The values that feed the products are rounded to T where the unfused kernels round them (the normed row,
// the activation, the product before its residual add), so both paths compute the same function, up to the
// order of the sums and last-bit differences such as rsqrtf's.
//
// Layout: W [n, k] row-major, as Hugging Face stores a linear layer. A block of WARPS warps computes
// WARPS * ROWS_PER_WARP outputs in two phases:
//   1. the block writes the product's input (x after the fused step, rounded to T) into shared memory once:
//      its warps then share it instead of each reading x again;
//   2. each warp streams its ROWS_PER_WARP weight rows, lane l taking the 16-byte packs l, l + 32, ... so that
//      a warp's loads are 512 contiguous bytes, and adds up its partial sums with shuffles: no barrier.
// Weights are the bytes that matter, and memory only delivers at full speed with enough of them in flight:
// each lane keeps ROWS_PER_WARP * UNROLL loads going, the next batch issued before the current one is used,
// and the first batch is issued before phase 1, so that its latency hides the input's preparation.

#include "reduce.cuh"

namespace matvec {
constexpr int WARPS = 16, ROWS_PER_WARP = 1, UNROLL = 4;  // the best of seven shapes tried on an H100
constexpr int THREADS = WARPS * 32, ROWS = WARPS * ROWS_PER_WARP;  // ROWS outputs per block
enum Input { PLAIN = 0, RMS_NORM = 1, SILU_MUL = 2 };
}  // namespace matvec

// y [n] (Out: T, or float for logits) from W [n, k] and x [k] ([2k] for SILU_MUL); norm_weight [k] for RMS_NORM.
// Dynamic shared memory: k elements of T.
template <typename T, typename Out, int INPUT, bool ADD>
__global__ void __launch_bounds__(matvec::THREADS)
    matvec_kernel(Out* __restrict__ y, const T* __restrict__ w, const T* __restrict__ x,
                  const T* __restrict__ norm_weight, float eps, int n, int k) {
    using namespace matvec;
    constexpr int PACK = 16 / sizeof(T), BATCH = 32 * UNROLL;  // packs of a row per batch
    using P = Pack<T, PACK>;
    extern __shared__ __align__(16) unsigned char shared[];
    T* input = reinterpret_cast<T*>(shared);
    const int packs = k / PACK, lane = threadIdx.x % 32, row0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS_PER_WARP;

    const P* rows[ROWS_PER_WARP];  // rows past n read the last row; their sums are dropped
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r)
        rows[r] = reinterpret_cast<const P*>(w + static_cast<size_t>(min(row0 + r, n - 1)) * k);
    P next[ROWS_PER_WARP][UNROLL];
    auto load_batch = [&](int base) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r)
                if (base + u * 32 + lane < packs) next[r][u] = rows[r][base + u * 32 + lane];
    };
    load_batch(0);
    float old = 0.0f;  // ADD: the value the lane's output row holds now, fetched early too
    if constexpr (ADD) {
        if (lane < ROWS_PER_WARP && row0 + lane < n) old = to_float(reinterpret_cast<const T*>(y)[row0 + lane]);
    }

    // Phase 1: the input, into shared memory.
    float sum_sq = 0.0f;
    for (int p = threadIdx.x; p < packs; p += THREADS) {
        float v[PACK];
        load_floats<T, PACK>(x, p, v);
        if constexpr (INPUT == SILU_MUL) {
            float up[PACK];
            load_floats<T, PACK>(x + k, p, up);
#pragma unroll
            for (int j = 0; j < PACK; ++j) v[j] = v[j] / (1.0f + expf(-v[j])) * up[j];
        }
        if constexpr (INPUT == RMS_NORM) {
#pragma unroll
            for (int j = 0; j < PACK; ++j) sum_sq += v[j] * v[j];
        }
        store_floats<T, PACK>(input, p, v);
    }
    if constexpr (INPUT == RMS_NORM) {
        const float inv_rms = rsqrtf(block_sum(sum_sq) / k + eps);
        // Each thread rescales the packs it wrote above: no barrier needed.
        reload_scale_and_store<T, PACK>(input, input, norm_weight, inv_rms, packs);
    }
    __syncthreads();

    // Phase 2: each warp's rows against the input.
    float sums[ROWS_PER_WARP] = {};
    for (int base = 0; base < packs; base += BATCH) {
        P current[ROWS_PER_WARP][UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) current[r][u] = next[r][u];
        if (base + BATCH < packs) load_batch(base + BATCH);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = base + u * 32 + lane;
            if (p >= packs) continue;
            float v[PACK];
            load_floats<T, PACK>(input, p, v);
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
                for (int j = 0; j < PACK; ++j) sums[r] += to_float(current[r][u].e[j]) * v[j];
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const float total = warp_sum(sums[r]);
        if (lane == r && row0 + r < n) {
            if constexpr (ADD) {
                y[row0 + r] = from_float<Out>(to_float(from_float<T>(total)) + old);
            } else {
                y[row0 + r] = from_float<Out>(total);
            }
        }
    }
}

#define MATVEC_KERNEL(T, Out, INPUT, ADD) \
    template __global__ void matvec_kernel<T, Out, INPUT, ADD>(Out*, const T*, const T*, const T*, float, int, int);
#define MATVEC_KERNELS(T)                        \
    MATVEC_KERNEL(T, T, matvec::PLAIN, true)     \
    MATVEC_KERNEL(T, T, matvec::SILU_MUL, true)  \
    MATVEC_KERNEL(T, T, matvec::RMS_NORM, false)

MATVEC_KERNELS(float)
MATVEC_KERNELS(__half)
MATVEC_KERNELS(__nv_bfloat16)
MATVEC_KERNEL(__half, float, matvec::RMS_NORM, false)  // fp32 logits from fp16 and bf16 models
MATVEC_KERNEL(__nv_bfloat16, float, matvec::RMS_NORM, false)
