// bf16 for the CPU warp emulator: the few names of CUDA's <cuda_bf16.h> the course's kernels use.
//
// bfloat16 is the top 16 bits of a float32 (8 exponent bits, 7 mantissa bits), the layout ml_dtypes'
// bfloat16 shares. Rounding to it is round to nearest even on the 16 bits dropped.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

namespace course_emulator {
inline unsigned short bfloat16_bits(float value) {
    std::uint32_t f;
    std::memcpy(&f, &value, 4);
    if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((f >> 16) | 0x40u);  // NaN stays NaN
    return static_cast<unsigned short>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

inline float bfloat16_value(unsigned short bits) {
    const std::uint32_t f = static_cast<std::uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &f, 4);
    return value;
}
}  // namespace course_emulator

inline float __bfloat162float(__nv_bfloat16 h) { return course_emulator::bfloat16_value(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16{course_emulator::bfloat16_bits(v)}; }
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
