// PTX wrappers for the tensor-core GEMM steps 6 (mma.sync) and 7 (wgmma): one instruction each.
//
// CUDA C has no names for these instructions, so each wrapper is one line of inline PTX with a
// comment that says what the hardware does. Shared-memory addresses are 32-bit offsets in the
// shared window (what PTX's .shared state space takes), made with smem_address().
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ unsigned smem_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---- the 128-byte swizzle ------------------------------------------------------------------------
// Shared memory serves 32 banks of 4 bytes: a 128-byte line. A tile whose rows are 128 bytes apart
// puts a column of 16-byte chunks into the same 4 banks, so ldmatrix reading 8 rows of one column
// would be an 8-way conflict. XOR-ing the chunk's index within its line (bits 0-2) with the line's
// index (bits 3-5) spreads those 8 rows over all 32 banks. TMA's CU_TENSOR_MAP_SWIZZLE_128B writes
// exactly this pattern, and wgmma's 128B-swizzle descriptors read it.
__device__ __forceinline__ unsigned swizzle_128b(unsigned chunk) { return chunk ^ ((chunk >> 3) & 7); }

// ---- which tile of C a block computes ---------------------------------------------------------------
// Blocks start in the order of blockIdx.x. Walking C row by row, the blocks resident at once would
// share one panel of A but read all of B; walking `group` tile rows down before moving right, they
// share a few panels of each, which stay in L2 while they are reused (fewer trips to HBM).
__device__ __forceinline__ void grouped_tile(int tiles_m, int tiles_n, int group, int& tile_m, int& tile_n) {
    const int per_group = group * tiles_n, first = blockIdx.x / per_group * group;
    const int rows = min(group, tiles_m - first), within = blockIdx.x % per_group;
    tile_m = first + within % rows;
    tile_n = within / rows;
}

#if defined(COURSE_EMULATOR)
// The CPU warp emulator (course_lib/emulator) defines these instructions in C++, by the same names.
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// ---- cp.async: global -> shared without passing through registers (sm_80) ------------------------
// Copies 16 bytes, or writes 16 zero bytes when `inside` is false (the source is then not read):
// that zero fill is how the edges of A and B are padded.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool inside) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(inside ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most `PENDING` of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// ---- ldmatrix: four 8x8 tiles of 16-bit values from shared memory into mma fragments ------------
// Lane i gives the address of row i % 8 of tile i / 8; every lane receives one 32-bit register
// (two elements) of each tile, in the order mma.sync expects. `.trans` hands out the transpose.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// ---- mma.sync m16n8k16: a warp computes D[16x8] += A[16x16] * B[16x8] in fp32 --------------------
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4],
                                                            const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Two fp32 values rounded to T and packed into the 32 bits one store moves.
template <typename T>
__device__ __forceinline__ unsigned pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack_pair<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned pack_pair<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
}
