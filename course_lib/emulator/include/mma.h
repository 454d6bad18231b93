// nvcuda::wmma for the CPU warp emulator: fragments, loads, stores and mma_sync with WMMA's semantics.
//
// WMMA's fragments are opaque: CUDA documents what a whole warp's fragment holds, not which lane holds what.
// So the emulator picks the plainest layout, lane l holding elements l * num_elements ... of the tile in row-major
// order, and computes mma_sync from the whole warp's fragments (summed in double and rounded once, as in
// mma.sync's emulation). Every call is warp-wide, as on a GPU: all 32 lanes must reach it, with the same arguments. Pointers
// must be 32-byte aligned and ldm a multiple of 16 bytes, as the CUDA C++ Programming Guide requires.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct tile_shape;  // rows and columns of the matrix a fragment holds
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols / 32;
    T x[num_elements];
};

namespace emulated {
inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T element(float v) {
    if constexpr (std::is_same_v<T, __half>) {
        return __float2half_rn(v);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return __float2bfloat16_rn(v);
    } else {
        return static_cast<T>(v);
    }
}

// Every lane of the warp must arrive, with the same pointer and stride; then each lane moves its own elements.
inline void warp_wide(const char* what, const void* pointer, unsigned ldm, std::size_t item_bytes) {
    struct Call {
        const void* pointer;
        unsigned ldm;
    };
    const auto all = course_emulator::warp_exchange<Call>(what, Call{pointer, ldm});
    for (int lane = 0; lane < course_emulator::WARP_SIZE; ++lane)
        if (all[lane].pointer != pointer || all[lane].ldm != ldm)
            course_emulator::fail(std::string(what) + ": the lanes of a warp passed different pointers or strides");
    if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0)
        course_emulator::fail(std::string(what) + ": the pointer must be 32-byte aligned (256 bits)");
    if (ldm * item_bytes % 16 != 0)
        course_emulator::fail(std::string(what) + ": ldm must be a multiple of 16 bytes (8 halves, 4 floats)");
}

// Element e of this lane's fragment: its (row, column) in the tile.
template <typename Fragment>
void place(int e, int& row, int& column) {
    const int index = course_emulator::active->current->lane * Fragment::num_elements + e;
    row = index / Fragment::cols, column = index % Fragment::cols;
}
}  // namespace emulated

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = emulated::element<T>(emulated::value(v));
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>, "loading an accumulator takes a layout (mem_row_major)");
    using Fragment = fragment<Use, M, N, K, T, Layout>;
    emulated::warp_wide("wmma::load_matrix_sync", p, ldm, sizeof(T));
    for (int e = 0, row, column; e < f.num_elements; ++e) {
        emulated::place<Fragment>(e, row, column);
        f.x[e] = std::is_same_v<Layout, row_major> ? p[row * ldm + column] : p[column * ldm + row];
    }
    course_emulator::warp_exchange<int>("wmma::load_matrix_sync (all lanes have read)", 0);
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
    emulated::warp_wide("wmma::load_matrix_sync", p, ldm, sizeof(T));
    for (int e = 0, row, column; e < f.num_elements; ++e) {
        emulated::place<fragment<accumulator, M, N, K, T>>(e, row, column);
        f.x[e] = layout == mem_row_major ? p[row * ldm + column] : p[column * ldm + row];
    }
    course_emulator::warp_exchange<int>("wmma::load_matrix_sync (all lanes have read)", 0);
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    emulated::warp_wide("wmma::store_matrix_sync", p, ldm, sizeof(T));
    for (int e = 0, row, column; e < f.num_elements; ++e) {
        emulated::place<fragment<accumulator, M, N, K, T>>(e, row, column);
        (layout == mem_row_major ? p[row * ldm + column] : p[column * ldm + row]) = f.x[e];
    }
}

// d = a b + c over the whole warp's fragments.
template <int M, int N, int K, typename In, typename LayoutA, typename LayoutB, typename Acc>
void mma_sync(fragment<accumulator, M, N, K, Acc>& d, const fragment<matrix_a, M, N, K, In, LayoutA>& a,
              const fragment<matrix_b, M, N, K, In, LayoutB>& b, const fragment<accumulator, M, N, K, Acc>& c) {
    using A = fragment<matrix_a, M, N, K, In, LayoutA>;
    using B = fragment<matrix_b, M, N, K, In, LayoutB>;
    using C = fragment<accumulator, M, N, K, Acc>;
    struct Operands {
        In a[A::num_elements], b[B::num_elements];
    };
    Operands mine;
    for (int e = 0; e < A::num_elements; ++e) mine.a[e] = a.x[e];
    for (int e = 0; e < B::num_elements; ++e) mine.b[e] = b.x[e];
    const auto all = course_emulator::warp_exchange<Operands>("wmma::mma_sync", mine);
    auto a_at = [&](int row, int k) {
        const int index = row * A::cols + k;
        return static_cast<double>(emulated::value(all[index / A::num_elements].a[index % A::num_elements]));
    };
    auto b_at = [&](int k, int column) {
        const int index = k * B::cols + column;
        return static_cast<double>(emulated::value(all[index / B::num_elements].b[index % B::num_elements]));
    };
    Acc result[C::num_elements];
    for (int e = 0, row, column; e < C::num_elements; ++e) {
        emulated::place<C>(e, row, column);
        double sum = 0.0;
        for (int k = 0; k < K; ++k) sum += a_at(row, k) * b_at(k, column);
        result[e] = emulated::element<Acc>(static_cast<float>(emulated::value(c.x[e]) + sum));
    }
    for (int e = 0; e < C::num_elements; ++e) d.x[e] = result[e];
}
}  // namespace wmma
}  // namespace nvcuda
