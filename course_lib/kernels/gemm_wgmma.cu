// GEMM step 7: Hopper's warpgroup MMA (wgmma) fed by the Tensor Memory Accelerator (TMA). sm_90a only.
//
// C = A @ B with A [M, K] and B [K, N] row-major, fp16 or bf16, fp32 accumulators. Three changes
// from step 6, each removing work that the SM's threads did there:
//   * TMA: one thread asks the copy engine for a whole tile ("rows r..r+127 of A, columns k..k+63")
//     described by a tensor map built on the host; the engine writes it into shared memory already
//     swizzled, fills whatever lies past the edges of the matrix with zeros, and counts the bytes on
//     an mbarrier. No address arithmetic, no per-thread copies, no bounds checks in the kernel.
//   * wgmma: a warpgroup (4 warps, 128 threads) multiplies a 64 x 16 slice of A by a 16 x 256 slice
//     of B straight from shared memory (described by 64-bit descriptors; no ldmatrix) into 128 fp32
//     registers per thread, asynchronously: the threads issue it and wait only when they need to
//     (here at the end of each stage, before the stage is handed back to the producer).
//   * warp specialisation: warpgroup 0 is the producer (it lowers its register limit with setmaxnreg,
//     and one of its threads issues the TMA copies); warpgroups 1 and 2 are consumers, each owning 64
//     rows of the block's 128 x 256 tile of C. Producer and consumers meet on two mbarriers per
//     stage: `full` (the tile has landed) and `empty` (both consumers are done reading it).
// Shared memory per stage: A's 128 x 64 tile (128-byte rows, K-major) and B's 64 x 256 tile as four
// panels of 64 rows x 64 columns (128-byte rows, N-major): 48 KiB; four stages in flight.
// The tensor maps need 16-byte aligned rows (K and N multiples of 8, checked by the launcher).

#include "tensor_core.cuh"

// The 128-byte CUtensorMap the host encodes (cuTensorMapEncodeTiled); the kernel only passes its
// address to the TMA instruction, so an opaque, 64-byte aligned block is all it needs to know.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

namespace wgmma_gemm {
constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, CONSUMERS = 2;
constexpr int THREADS = 128 * (1 + CONSUMERS);
constexpr int PANEL = 64;                              // B's tile is stored as BN / 64 panels
constexpr int A_BYTES = BM * BK * 2, PANEL_BYTES = BK * PANEL * 2, STAGE_BYTES = A_BYTES + BN / PANEL * PANEL_BYTES;
constexpr int ALIGN = 1024;                            // a 128B-swizzle atom: 8 rows of 128 bytes
constexpr int GROUP_M = 16;                            // tile rows that run together and share B in L2

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ---- mbarriers: a counter in shared memory that a phase completes when enough arrivals came ------
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Arrive once and announce that `bytes` more will land through TMA before this phase completes.
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spin until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    }
}

// ---- TMA: copy the box at coordinates (inner, outer) of a tensor map into shared memory ----------
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap* map, int inner, int outer, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
            "r"(dst), "l"(map), "r"(inner), "r"(outer), "r"(bar)
        : "memory");
}

// ---- wgmma ------------------------------------------------------------------------------------------
// A shared-memory matrix descriptor: start address, the two strides between 8 x 128-byte swizzle atoms
// (leading: along N for an N-major B, unused for K-major; stride: to the next 8 rows), 128B swizzle.
__device__ __forceinline__ unsigned long long descriptor(unsigned address, unsigned leading_bytes,
                                                         unsigned stride_bytes) {
    return static_cast<unsigned long long>((address & 0x3FFFF) >> 4) |
           static_cast<unsigned long long>(leading_bytes >> 4) << 16 |
           static_cast<unsigned long long>(stride_bytes >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

#define WGMMA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                      "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_ACC32(i) WGMMA_ACC8(i), WGMMA_ACC8(i + 8), WGMMA_ACC8(i + 16), WGMMA_ACC8(i + 24)
#define WGMMA_OPERANDS                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "   \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "   \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "   \
    "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "   \
    "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "   \
    "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "      \
    "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "       \
    "%128, %129, 1, 1, 1, 0, 1;\n"  // A and B descriptors; scale D, A, B by 1; A K-major, B N-major

// D[64 x 256] += A[64 x 16] * B[16 x 256]: d holds this thread's 128 of the warpgroup's results.
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], unsigned long long a, unsigned long long b);
template <>
__device__ __forceinline__ void wgmma_m64n256k16<__half>(float (&d)[128], unsigned long long a, unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " WGMMA_OPERANDS
                 : WGMMA_ACC32(0), WGMMA_ACC32(32), WGMMA_ACC32(64), WGMMA_ACC32(96)
                 : "l"(a), "l"(b));
}
template <>
__device__ __forceinline__ void wgmma_m64n256k16<__nv_bfloat16>(float (&d)[128], unsigned long long a,
                                                                unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WGMMA_OPERANDS
                 : WGMMA_ACC32(0), WGMMA_ACC32(32), WGMMA_ACC32(64), WGMMA_ACC32(96)
                 : "l"(a), "l"(b));
}

// The consumer's accumulators hold, per 8 columns j, C[r][8j + 2t..] and C[r + 8][8j + 2t..] with
// r = 16 * warp + lane / 4 and t = lane % 4 (the mma.sync layout, stacked over the 4 warps).
template <typename T>
__device__ __forceinline__ void store_c(T* c, const float (&d)[128], int m, int n, int row0, int col0) {
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + warp * 16 + lane / 4 + half * 8, col = col0 + j * 8 + (lane % 4) * 2;
            if (row < m && col < n)  // N is even, so col + 1 < n too
                *reinterpret_cast<unsigned*>(c + static_cast<size_t>(row) * n + col) =
                    pack_pair<T>(d[j * 4 + half * 2], d[j * 4 + half * 2 + 1]);
        }
}
#endif
}  // namespace wgmma_gemm

// ---- 7. wgmma + TMA, warp-specialised -------------------------------------------------------------
// One block of 384 threads per 128 x 256 tile of C (1-D grid, see grouped_tile). Dynamic shared
// memory: STAGES * STAGE_BYTES + ALIGN (the launcher sets it). a_map tiles A in boxes of 64 x 128
// (K x M), b_map tiles B in boxes of 64 x 64 (N x K), both with the 128-byte swizzle.
template <typename T>
__global__ void __launch_bounds__(wgmma_gemm::THREADS, 1)
    gemm_wgmma(T* __restrict__ c, const TensorMap* a_map, const TensorMap* b_map, int m, int n, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wgmma_gemm;
    extern __shared__ unsigned char raw[];
    __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
    const unsigned tiles = (smem_address(raw) + ALIGN - 1) / ALIGN * ALIGN;  // swizzle atoms start 1024-aligned
    auto a_tile = [&](int s) { return tiles + s * STAGE_BYTES; };
    auto b_tile = [&](int s) { return tiles + s * STAGE_BYTES + A_BYTES; };

    int tile_m, tile_n;
    grouped_tile((m + BM - 1) / BM, (n + BN - 1) / BN, GROUP_M, tile_m, tile_n);
    const int k_tiles = (k + BK - 1) / BK, warpgroup = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(smem_address(&full[s]), 1);  // the producer's arrive (plus the TMA bytes)
            mbarrier_init(smem_address(&empty[s]), CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA unit
    }
    __syncthreads();

    if (warpgroup == 0) {  // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            for (int kt = 0; kt < k_tiles; ++kt) {
                const int s = kt % STAGES, round = kt / STAGES;
                mbarrier_wait(smem_address(&empty[s]), (round & 1) ^ 1);  // round 0 passes at once
                mbarrier_expect_bytes(smem_address(&full[s]), STAGE_BYTES);
                tma_load(a_tile(s), a_map, kt * BK, tile_m * BM, smem_address(&full[s]));
                for (int p = 0; p < BN / PANEL; ++p)
                    tma_load(b_tile(s) + p * PANEL_BYTES, b_map, tile_n * BN + p * PANEL, kt * BK,
                             smem_address(&full[s]));
            }
        }
    } else {  // consumers: warpgroup w owns rows 64 (w - 1) .. 64 w - 1 of the tile
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int consumer = warpgroup - 1;
        float d[128] = {};
        for (int kt = 0; kt < k_tiles; ++kt) {
            const int s = kt % STAGES;
            mbarrier_wait(smem_address(&full[s]), (kt / STAGES) & 1);
            wgmma_fence();
#pragma unroll
            for (int k16 = 0; k16 < BK / 16; ++k16) {
                // A: 64 rows down for the second consumer, 32 bytes (16 elements) along K per step.
                const auto a = descriptor(a_tile(s) + consumer * 64 * BK * 2 + k16 * 32, 16, 1024);
                // B: 16 rows (two 8-row atoms) per step; the next 64 columns are one panel further on.
                const auto b = descriptor(b_tile(s) + k16 * 16 * PANEL * 2, PANEL_BYTES, 1024);
                wgmma_m64n256k16<T>(d, a, b);
            }
            wgmma_commit();
            wgmma_wait_all();
            if (threadIdx.x % 128 == 0) mbarrier_arrive(smem_address(&empty[s]));  // the stage may be refilled
        }
        store_c<T>(c, d, m, n, tile_m * BM + consumer * 64, tile_n * BN);
    }
#else
    __trap();  // unreachable: the launcher runs this kernel only on sm_90 built as sm_90a
#endif
}

template __global__ void gemm_wgmma<__half>(__half*, const TensorMap*, const TensorMap*, int, int, int);
template __global__ void gemm_wgmma<__nv_bfloat16>(__nv_bfloat16*, const TensorMap*, const TensorMap*, int, int, int);
