// Element types and 16-byte packs, shared by the course's kernels.
//
// Storage is fp32, fp16 or bf16; arithmetic is always fp32. A Pack<T, PACK> is PACK elements that
// one load or store instruction moves (16 bytes when PACK * sizeof(T) == 16): the widest access a
// thread can make, and the way to keep a memory-bound kernel at the speed of a copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---- element conversions -------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// PACK elements moved by one load or store instruction (16 bytes when PACK * sizeof(T) == 16).
template <typename T, int PACK>
struct alignas(sizeof(T) * PACK) Pack {
    T e[PACK];
};

template <typename T, int PACK>
__device__ __forceinline__ void load_floats(const T* row, int pack_index, float (&out)[PACK]) {
    const Pack<T, PACK> p = reinterpret_cast<const Pack<T, PACK>*>(row)[pack_index];
#pragma unroll
    for (int j = 0; j < PACK; ++j) out[j] = to_float(p.e[j]);
}

template <typename T, int PACK>
__device__ __forceinline__ void store_floats(T* row, int pack_index, const float (&in)[PACK]) {
    Pack<T, PACK> p;
#pragma unroll
    for (int j = 0; j < PACK; ++j) p.e[j] = from_float<T>(in[j]);
    reinterpret_cast<Pack<T, PACK>*>(row)[pack_index] = p;
}
