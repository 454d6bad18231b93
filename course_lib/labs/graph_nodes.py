"""A CUDA graph built node by node with cuda-python's driver API, and a kernel node's arguments updated in place.

Stream capture (``course_lib.engine.graphs``) records whatever a stream is asked to do. A graph can also be
written by hand: create an empty graph, add kernel nodes (a function, a grid, a block and the arguments),
link them by dependencies, instantiate it into an executable graph, launch. The executable graph can then
be changed without rebuilding it: ``cuGraphExecKernelNodeSetParams`` gives a kernel node new arguments (new
pointers, a new length, even another function of the same context). ``course_lib.engine.graphs`` does not
need this: it copies each step's inputs into fixed buffers. Re-pointing nodes is the alternative, for
buffers too large to copy.

The kernels are CuPy ``RawKernel`` objects: their ``kernel.ptr`` is the driver's ``CUfunction``. Arguments
are given here as ``(value, ctypes type)`` pairs; cuda-python takes them as two parallel tuples, values and
types, and ``_node_params`` makes those.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from course_lib import backend

Arguments = Sequence[tuple[Any, type]]  # (value, ctypes type) for each kernel parameter, in order


def _driver_call(result: tuple, what: str) -> Any:
    """cuda-python returns (error, value...): raise on an error, hand back the value."""
    from cuda.bindings import driver

    error, *values = result
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {driver.cuGetErrorName(error)[1].decode()}")
    return values[0] if values else None


def _node_params(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], arguments: Arguments) -> Any:
    from cuda.bindings import driver

    params = driver.CUDA_KERNEL_NODE_PARAMS()
    params.func = driver.CUfunction(kernel.kernel.ptr)
    params.gridDimX, params.gridDimY, params.gridDimZ = grid
    params.blockDimX, params.blockDimY, params.blockDimZ = block
    params.sharedMemBytes = 0
    params.kernelParams = (tuple(value for value, _ in arguments), tuple(kind for _, kind in arguments))
    return params


def pointer(array: Any) -> tuple[int, type]:
    """A device array as a kernel argument."""
    return array.data.ptr, ctypes.c_void_p


class KernelGraph:
    """A graph of kernel nodes, each depending on the one added before it (a chain, as a stream would run them)."""

    def __init__(self) -> None:
        if not backend.has_gpu():
            raise RuntimeError(f"a CUDA graph holds GPU work: {backend.mode_text()}")
        from cuda.bindings import driver

        self.graph = _driver_call(driver.cuGraphCreate(0), "cuGraphCreate")
        self.nodes: list[Any] = []
        self.executable: Any = None

    def add_kernel(self, kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                   arguments: Arguments) -> Any:
        """Append a launch of ``kernel``; returns its node (to update its arguments later)."""
        from cuda.bindings import driver

        if self.executable is not None:
            raise RuntimeError("the graph is instantiated already: add every node first")
        after = self.nodes[-1:]
        node = _driver_call(driver.cuGraphAddKernelNode(self.graph, after, len(after),
                                                        _node_params(kernel, grid, block, arguments)),
                            "cuGraphAddKernelNode")
        self.nodes.append(node)
        return node

    def instantiate(self) -> None:
        from cuda.bindings import driver

        self.executable = _driver_call(driver.cuGraphInstantiate(self.graph, 0), "cuGraphInstantiate")

    def launch(self) -> None:
        """Run the whole graph on CuPy's current stream."""
        from cuda.bindings import driver

        if self.executable is None:
            self.instantiate()
        stream = driver.CUstream(backend.xp.cuda.get_current_stream().ptr)
        _driver_call(driver.cuGraphLaunch(self.executable, stream), "cuGraphLaunch")

    def set_arguments(self, node: Any, kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                      arguments: Arguments) -> None:
        """Give an instantiated graph's ``node`` new arguments (and grid), without rebuilding the graph."""
        from cuda.bindings import driver

        if self.executable is None:
            self.instantiate()
        _driver_call(driver.cuGraphExecKernelNodeSetParams(self.executable, node,
                                                           _node_params(kernel, grid, block, arguments)),
                     "cuGraphExecKernelNodeSetParams")
