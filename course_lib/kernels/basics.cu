// The small kernels of chapter 01: a grid-stride loop, a strided copy for the coalescing
// experiment, and two ways to sum an array (a shared-memory tree and warp shuffles).
//
// Every kernel is extern "C", so CuPy finds it by its plain name. basics.py holds their launchers,
// the same kernels written in Numba, and the NumPy references.

// vector_add with a grid-stride loop: any grid covers any n.
//
// Each thread starts at its global index and steps by the number of threads in the whole grid, so
// the launch is sized to the GPU (a few blocks per SM), not to the data. The index is 64-bit:
// i + step must not overflow for arrays of 2^31 elements or more.
extern "C" __global__ void vector_add_grid_stride(const float* __restrict__ a,
                                                  const float* __restrict__ b,
                                                  float* __restrict__ out,
                                                  long long n) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        out[i] = a[i] + b[i];
    }
}

// strided_copy: read x as a matrix of rows x stride floats, stored row by row, and write it out
// column by column (a transpose): out[column * rows + row] = x[row * stride + column].
//
// blockIdx.y is the column, blockIdx.x and threadIdx.x the row. A warp's 32 threads read elements
// `stride` floats apart and write side by side. Every element is read once and written once whatever the stride: the
// useful bytes stay the same and only the pattern of the reads changes. With stride 1 this is a
// plain copy. Indices are 32-bit: the launcher keeps rows * stride below 2^31.
extern "C" __global__ void strided_copy(const float* __restrict__ x,
                                        float* __restrict__ out,
                                        int rows,
                                        int stride) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    int column = blockIdx.y;
    if (row < rows) {
        out[column * rows + row] = x[row * stride + column];
    }
}

// Summing an array in three stages:
//   1. each thread adds up its share of x in a register, with a grid-stride loop;
//   2. the threads of a block combine their sums (a shared-memory tree, or warp shuffles);
//   3. one thread per block adds the block's sum to *total with atomicAdd.
// A few hundred blocks make a few hundred atomics: nothing next to reading x. Their order changes
// from run to run, so the last bits of the total may too. The launcher zeroes *total first.
// Acc is the accumulator type: float (fast, loses digits over millions of additions) or double.

constexpr int REDUCE_THREADS = 256;  // the block size the reductions are written for
constexpr int WARP_SIZE = 32;        // threads that execute together, and that shuffles connect

// Stage 1: this thread's share of x, summed in a register.
template <typename Acc>
__device__ Acc thread_sum(const float* __restrict__ x, long long n) {
    Acc sum = 0;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        sum += x[i];
    }
    return sum;
}

// Stage 2 through shared memory: at each of log2(256) = 8 steps the lower half of the active
// threads adds in the upper half's values, and a barrier waits until every addition is done.
template <typename Acc>
__device__ void tree_sum(const float* __restrict__ x, Acc* total, long long n) {
    __shared__ Acc partial[REDUCE_THREADS];
    int t = threadIdx.x;
    partial[t] = thread_sum<Acc>(x, n);
    __syncthreads();
    for (int half = REDUCE_THREADS / 2; half > 0; half /= 2) {
        if (t < half) {
            partial[t] += partial[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        atomicAdd(total, partial[0]);
    }
}

// Stage 2 within a warp, through registers: __shfl_down_sync hands each thread the value of the
// thread `offset` lanes above it. After offsets 16, 8, 4, 2, 1, lane 0 holds the warp's sum.
template <typename Acc>
__device__ Acc warp_sum(Acc value) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;
}

// Each warp sums its 32 values with shuffles, the 8 warp sums meet in shared memory, and the first
// warp sums those: one barrier instead of eight.
template <typename Acc>
__device__ void shuffle_sum(const float* __restrict__ x, Acc* total, long long n) {
    __shared__ Acc warp_sums[REDUCE_THREADS / WARP_SIZE];
    int lane = threadIdx.x % WARP_SIZE;
    int warp = threadIdx.x / WARP_SIZE;
    Acc sum = warp_sum(thread_sum<Acc>(x, n));
    if (lane == 0) {
        warp_sums[warp] = sum;
    }
    __syncthreads();
    if (warp == 0) {
        sum = warp_sum(lane < REDUCE_THREADS / WARP_SIZE ? warp_sums[lane] : Acc(0));
        if (lane == 0) {
            atomicAdd(total, sum);
        }
    }
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
tree_sum_float32(const float* __restrict__ x, float* total, long long n) {
    tree_sum(x, total, n);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
tree_sum_float64(const float* __restrict__ x, double* total, long long n) {
    tree_sum(x, total, n);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
shuffle_sum_float32(const float* __restrict__ x, float* total, long long n) {
    shuffle_sum(x, total, n);
}

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
shuffle_sum_float64(const float* __restrict__ x, double* total, long long n) {
    shuffle_sum(x, total, n);
}
