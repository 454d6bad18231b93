"""Graphs built node by node: a chain of kernel nodes computes what the launches would, and a node of an
instantiated graph takes new arguments without a rebuild. Needs a GPU."""

import ctypes

import numpy as np
import pytest

from course_lib import backend
from course_lib.labs.graph_nodes import KernelGraph, pointer

SOURCE = r'''
extern "C" __global__ void axpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
'''


@pytest.mark.skipif(backend.has_gpu(), reason="checks the CPU-mode message")
def test_a_kernel_graph_says_it_needs_a_gpu():
    with pytest.raises(RuntimeError, match="a CUDA graph holds GPU work"):
        KernelGraph()


@pytest.mark.gpu
def test_a_chain_of_nodes_then_new_arguments_for_one():
    cupy = backend.xp
    axpy = cupy.RawKernel(SOURCE, "axpy")
    n = 1000
    x = cupy.asarray(np.random.default_rng().standard_normal(n, dtype=np.float32))
    y, other = cupy.zeros(n, dtype=cupy.float32), cupy.zeros(n, dtype=cupy.float32)
    grid, block = ((n + 127) // 128, 1, 1), (128, 1, 1)
    graph = KernelGraph()
    nodes = [graph.add_kernel(axpy, grid, block, [(a, ctypes.c_float), pointer(x), pointer(y), (n, ctypes.c_int)])
             for a in (1.0, 2.0)]
    graph.launch()
    cupy.testing.assert_allclose(y, 3 * x, rtol=1e-6)
    graph.set_arguments(nodes[1], axpy, grid, block, [(5.0, ctypes.c_float), pointer(x), pointer(other),
                                                      (n, ctypes.c_int)])
    graph.launch()
    cupy.testing.assert_allclose(y, 4 * x, rtol=1e-6)
    cupy.testing.assert_allclose(other, 5 * x, rtol=1e-6)
    with pytest.raises(RuntimeError, match="instantiated already"):
        graph.add_kernel(axpy, grid, block, [(1.0, ctypes.c_float), pointer(x), pointer(y), (n, ctypes.c_int)])
