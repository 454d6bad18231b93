// The GEMM progression of chapter 03, steps 1 to 5: C = A @ B on the CUDA cores, then the tensor cores.
//
// A is [M, K], B is [K, N], C is [M, N], all row-major; elements are fp16 or bf16 (fp32 too), and
// every kernel accumulates in fp32 and rounds once when it stores C. Each step keeps the previous
// one's answer and changes one thing, to cut the bytes each multiply-add costs:
//   1. naive: one thread per element of C, every operand from global memory (2 loads per FMA);
//   2. shared-memory tiling: a block stages 32x32 tiles of A and B, each loaded once and used 32 times;
//   3. register blocking: each thread computes an 8x8 block of C from 8 + 8 values in registers,
//      64 FMAs for 16 shared-memory reads;
//   4. vectorised loads: step 3 with 16-byte global loads of the tiles (K and N multiples of 8);
//   5. tensor cores: WMMA 16x16x16 fragments, fp16/bf16 in, fp32 accumulators.
// Every kernel handles any M, N, K: loads past the edges read zeros, stores past them are skipped.

#include <mma.h>

#include "elements.cuh"

// ---- 1. naive ------------------------------------------------------------------------------------
template <typename T>
__global__ void gemm_naive(T* __restrict__ c, const T* __restrict__ a, const T* __restrict__ b, int m, int n,
                           int k) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;  // consecutive threads: consecutive columns
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= m || col >= n) return;
    float acc = 0.0f;
    for (int i = 0; i < k; ++i) acc += to_float(a[static_cast<size_t>(row) * k + i]) * to_float(b[static_cast<size_t>(i) * n + col]);
    c[static_cast<size_t>(row) * n + col] = from_float<T>(acc);
}

// ---- 2. shared-memory tiling ------------------------------------------------------------------------
constexpr int TILE = 32;

template <typename T>
__global__ void gemm_smem_tiled(T* __restrict__ c, const T* __restrict__ a, const T* __restrict__ b, int m,
                                int n, int k) {
    __shared__ float a_tile[TILE][TILE];
    __shared__ float b_tile[TILE][TILE];  // a warp reads along a row (b_tile[i][tx]): 32 banks, no conflict
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        a_tile[ty][tx] = (row < m && k0 + tx < k) ? to_float(a[static_cast<size_t>(row) * k + k0 + tx]) : 0.0f;
        b_tile[ty][tx] = (k0 + ty < k && col < n) ? to_float(b[static_cast<size_t>(k0 + ty) * n + col]) : 0.0f;
        __syncthreads();  // the tiles are complete before anyone reads them
#pragma unroll
        for (int i = 0; i < TILE; ++i) acc += a_tile[ty][i] * b_tile[i][tx];
        __syncthreads();  // everyone is done with the tiles before the next ones overwrite them
    }
    if (row < m && col < n) c[static_cast<size_t>(row) * n + col] = from_float<T>(acc);
}

// ---- 3 and 4. register blocking, scalar or 16-byte loads ----------------------------------------------
// A block of 256 threads computes a 128 x 128 tile of C in steps of BK = 16 along K. Thread (ty, tx)
// of a 16 x 16 grid owns the 8 x 8 outputs at rows ty*8.., columns tx*8..; per step of k it reads
// 8 values of A and 8 of B from shared memory and does 64 FMAs.
constexpr int BM = 128, BN = 128, BK = 16, TM = 8, TN = 8, THREADS = (BM / TM) * (BN / TN);

// A's tile is stored transposed, a_tile[k][m], so a thread's 8 rows are 8 consecutive floats.
template <typename T>
__device__ __forceinline__ void load_tiles_scalar(float (&a_tile)[BK][BM], float (&b_tile)[BK][BN], const T* a,
                                                  const T* b, int m, int n, int k, int row0, int col0, int k0) {
    for (int e = threadIdx.x; e < BM * BK; e += THREADS) {  // A: BM rows of BK values
        const int r = e / BK, kk = e % BK;
        const bool inside = row0 + r < m && k0 + kk < k;
        a_tile[kk][r] = inside ? to_float(a[static_cast<size_t>(row0 + r) * k + k0 + kk]) : 0.0f;
    }
    for (int e = threadIdx.x; e < BK * BN; e += THREADS) {  // B: BK rows of BN values
        const int kk = e / BN, cc = e % BN;
        const bool inside = k0 + kk < k && col0 + cc < n;
        b_tile[kk][cc] = inside ? to_float(b[static_cast<size_t>(k0 + kk) * n + col0 + cc]) : 0.0f;
    }
}

// The same tiles with one 16-byte load per thread for each (needs K and N multiples of 8, T 2 bytes):
// A's tile is 128 rows of 2 packs, B's is 16 rows of 16 packs: 256 packs each, one per thread.
template <typename T>
__device__ __forceinline__ void load_tiles_packed(float (&a_tile)[BK][BM], float (&b_tile)[BK][BN], const T* a,
                                                  const T* b, int m, int n, int k, int row0, int col0, int k0) {
    constexpr int PACK = 8;
    float v[PACK];
    const int a_row = threadIdx.x / (BK / PACK), a_k = (threadIdx.x % (BK / PACK)) * PACK;
    if (row0 + a_row < m && k0 + a_k < k) {
        load_floats<T, PACK>(a + static_cast<size_t>(row0 + a_row) * k + k0 + a_k, 0, v);
    } else {
#pragma unroll
        for (int j = 0; j < PACK; ++j) v[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < PACK; ++j) a_tile[a_k + j][a_row] = v[j];
    const int b_k = threadIdx.x / (BN / PACK), b_col = (threadIdx.x % (BN / PACK)) * PACK;
    if (k0 + b_k < k && col0 + b_col < n) {
        load_floats<T, PACK>(b + static_cast<size_t>(k0 + b_k) * n + col0 + b_col, 0, v);
    } else {
#pragma unroll
        for (int j = 0; j < PACK; ++j) v[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < PACK; ++j) b_tile[b_k][b_col + j] = v[j];
}

template <typename T, bool PACKED>
__global__ void __launch_bounds__(THREADS) gemm_register_blocked(T* __restrict__ c, const T* __restrict__ a,
                                                                 const T* __restrict__ b, int m, int n, int k) {
    __shared__ float a_tile[BK][BM];
    __shared__ float b_tile[BK][BN];
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const int ty = threadIdx.x / (BN / TN), tx = threadIdx.x % (BN / TN);
    float acc[TM][TN] = {};
    for (int k0 = 0; k0 < k; k0 += BK) {
        if constexpr (PACKED) {
            load_tiles_packed<T>(a_tile, b_tile, a, b, m, n, k, row0, col0, k0);
        } else {
            load_tiles_scalar<T>(a_tile, b_tile, a, b, m, n, k, row0, col0, k0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a_frag[TM], b_frag[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a_frag[i] = a_tile[kk][ty * TM + i];
#pragma unroll
            for (int j = 0; j < TN; ++j) b_frag[j] = b_tile[kk][tx * TN + j];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = row0 + ty * TM + i;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int col = col0 + tx * TN + j;
            if (row < m && col < n) c[static_cast<size_t>(row) * n + col] = from_float<T>(acc[i][j]);
        }
    }
}

// ---- 5. tensor cores through WMMA (fp16 and bf16 in, fp32 accumulators) ---------------------------
// A block of 4 warps computes a 64 x 64 tile of C; each warp owns a 32 x 32 quarter, four 16 x 16
// fragments. Per step of K = 16 the block stages A's 64 x 16 and B's 16 x 64 tiles in shared memory
// (zeros past the edges), and each warp issues 2 x 2 wmma::mma_sync: one instruction does a whole
// 16 x 16 x 16 product on the tensor cores. The accumulators pass through shared memory on the way
// out so that the edges of C can be guarded like every other step.
// bf16 fragments need sm_80; an sm_75 build keeps the fp16 kernel only.
template <typename T> struct WmmaSupported { static constexpr bool value = true; };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <> struct WmmaSupported<__nv_bfloat16> { static constexpr bool value = false; };
#endif

constexpr int WB = 64, WK = 16, WARP_TILE = 32, FRAG = 16, WMMA_THREADS = 128;

template <typename T>
__global__ void __launch_bounds__(WMMA_THREADS) gemm_wmma(T* __restrict__ c, const T* __restrict__ a,
                                                         const T* __restrict__ b, int m, int n, int k) {
    if constexpr (WmmaSupported<T>::value) {
        using namespace nvcuda;
        __shared__ __align__(32) T a_tile[WB][WK];
        __shared__ __align__(32) T b_tile[WK][WB];
        __shared__ __align__(32) float c_tile[WB][WB];
        const int row0 = blockIdx.y * WB, col0 = blockIdx.x * WB;
        const int warp = threadIdx.x / 32, warp_row = (warp / 2) * WARP_TILE, warp_col = (warp % 2) * WARP_TILE;
        wmma::fragment<wmma::accumulator, FRAG, FRAG, FRAG, float> acc[2][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
        for (int k0 = 0; k0 < k; k0 += WK) {
            for (int e = threadIdx.x; e < WB * WK; e += WMMA_THREADS) {
                const int r = e / WK, kk = e % WK;
                const bool inside = row0 + r < m && k0 + kk < k;
                a_tile[r][kk] = inside ? a[static_cast<size_t>(row0 + r) * k + k0 + kk] : from_float<T>(0.0f);
            }
            for (int e = threadIdx.x; e < WK * WB; e += WMMA_THREADS) {
                const int kk = e / WB, cc = e % WB;
                const bool inside = k0 + kk < k && col0 + cc < n;
                b_tile[kk][cc] = inside ? b[static_cast<size_t>(k0 + kk) * n + col0 + cc] : from_float<T>(0.0f);
            }
            __syncthreads();
            wmma::fragment<wmma::matrix_a, FRAG, FRAG, FRAG, T, wmma::row_major> a_frag[2];
            wmma::fragment<wmma::matrix_b, FRAG, FRAG, FRAG, T, wmma::row_major> b_frag[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], &a_tile[warp_row + i * FRAG][0], WK);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], &b_tile[0][warp_col + j * FRAG], WB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
                wmma::store_matrix_sync(&c_tile[warp_row + i * FRAG][warp_col + j * FRAG], acc[i][j], WB,
                                        wmma::mem_row_major);
        __syncthreads();
        for (int e = threadIdx.x; e < WB * WB; e += WMMA_THREADS) {
            const int r = e / WB, cc = e % WB;
            if (row0 + r < m && col0 + cc < n) c[static_cast<size_t>(row0 + r) * n + col0 + cc] = from_float<T>(c_tile[r][cc]);
        }
    } else {
        __trap();  // unreachable: the launcher refuses bf16 tensor cores below sm_80
    }
}

// ---- the instantiations the launchers use (and the compile checks report) -----------------------
#define GEMM_KERNELS(T)                                                                                  \
    template __global__ void gemm_naive<T>(T*, const T*, const T*, int, int, int);                      \
    template __global__ void gemm_smem_tiled<T>(T*, const T*, const T*, int, int, int);                 \
    template __global__ void gemm_register_blocked<T, false>(T*, const T*, const T*, int, int, int);

GEMM_KERNELS(float)
GEMM_KERNELS(__half)
GEMM_KERNELS(__nv_bfloat16)
template __global__ void gemm_wmma<__half>(__half*, const __half*, const __half*, int, int, int);
template __global__ void gemm_wmma<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int, int,
                                                  int);
template __global__ void gemm_register_blocked<__half, true>(__half*, const __half*, const __half*, int, int, int);
template __global__ void gemm_register_blocked<__nv_bfloat16, true>(__nv_bfloat16*, const __nv_bfloat16*,
                                                                    const __nv_bfloat16*, int, int, int);
