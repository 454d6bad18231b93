// fp16 for the CPU warp emulator: the few names of CUDA's <cuda_fp16.h> the course's kernels use.
//
// __half is IEEE binary16, stored as its 16 bits (the layout NumPy's float16 shares), so a kernel's
// pointers to __half read NumPy arrays as they are. Conversions round to nearest, ties to even, as
// the hardware's cvt.rn does; arithmetic happens in float, as in the course's kernels.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    unsigned short x;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;

namespace course_emulator {
// float -> binary16 bits, round to nearest even; too large -> infinity, too small -> (signed) zero.
inline unsigned short half_bits(float value) {
    std::uint32_t f;
    std::memcpy(&f, &value, 4);
    const std::uint32_t sign = (f >> 16) & 0x8000u, mantissa = f & 0x7fffffu;
    const int exponent = static_cast<int>((f >> 23) & 0xffu) - 127 + 15;  // rebiased for binary16
    if (((f >> 23) & 0xffu) == 0xffu) return static_cast<unsigned short>(sign | 0x7c00u | (mantissa ? 0x200u : 0u));
    if (exponent >= 31) return static_cast<unsigned short>(sign | 0x7c00u);
    std::uint32_t kept, dropped, halfway;
    if (exponent <= 0) {  // a subnormal half (or zero): the implicit 1 joins the mantissa, shifted further
        if (exponent < -10) return static_cast<unsigned short>(sign);
        const int shift = 14 - exponent;
        const std::uint32_t full = mantissa | 0x800000u;
        kept = full >> shift, dropped = full & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    } else {
        kept = (static_cast<std::uint32_t>(exponent) << 10) | (mantissa >> 13);
        dropped = mantissa & 0x1fffu, halfway = 0x1000u;
    }
    if (dropped > halfway || (dropped == halfway && (kept & 1u))) ++kept;  // a carry may reach the exponent: fine
    return static_cast<unsigned short>(sign | kept);
}

inline float decode_half(unsigned short bits) {
    const float sign = (bits & 0x8000u) ? -1.0f : 1.0f;
    const int exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
}

// Every one of the 65,536 values, decoded once: mma.sync reads thousands per instruction.
inline float half_value(unsigned short bits) {
    static const std::array<float, 65536> table = [] {
        std::array<float, 65536> values{};
        for (unsigned b = 0; b < 65536; ++b) values[b] = decode_half(static_cast<unsigned short>(b));
        return values;
    }();
    return table[bits];
}
}  // namespace course_emulator

inline float __half2float(__half h) { return course_emulator::half_value(h.x); }
inline __half __float2half_rn(float v) { return __half{course_emulator::half_bits(v)}; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
