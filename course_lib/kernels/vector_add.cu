// The first kernel of the course: one thread per element, and a guard for the ragged last block.
//
// blockIdx.x * blockDim.x + threadIdx.x is the thread's global index. The grid is rounded up to
// whole blocks, so the last block has threads past the end of the arrays: the `if` keeps them out.
extern "C" __global__ void vector_add(const float* __restrict__ a,
                                      const float* __restrict__ b,
                                      float* __restrict__ out,
                                      int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = a[i] + b[i];
    }
}
