"""A model of CUDA stream capture in pure Python: what a graph records, what it refuses, what a replay assumes.

A CUDA graph is easy to describe and easy to get wrong. This module runs the rules on NumPy arrays, with no
GPU, so that they can be tried and broken in CPU mode:

* **capture records, it does not run.** Between ``begin_capture`` and ``end_capture`` a stream's launches
  and asynchronous copies become nodes of a graph; nothing is computed until the graph is launched;
* **capture refuses what would wait.** Inside a capture in CUDA's default (global) mode, ``synchronize()``, a
  read back to ordinary (pageable) host memory (CuPy's ``.get()``), an asynchronous copy from pageable memory
  and a ``cudaMalloc`` (a "potentially unsafe" call: allowed, but not recorded, in relaxed mode) all fail, as
  CUDA fails them, with ``cudaErrorStreamCaptureUnsupported``; the capture is then broken,
  and ``end_capture`` fails with ``cudaErrorStreamCaptureInvalidated``. An asynchronous copy between pinned
  host memory and the device is allowed: it becomes a copy node;
* **a replay reuses the captured addresses.** A kernel node holds the pointers it was captured with. New
  inputs must be copied *into* those buffers; an input allocated anew lives at another address, which the
  graph never reads. CUDA does not notice (the replay reads the old buffer, or freed memory); this model
  does, and raises ``StaleAddressError`` naming the buffer;
* **an instantiated graph can be edited**: ``GraphExec.set_kernel_node_params`` gives a kernel node new
  arguments, as ``cudaGraphExecKernelNodeSetParams`` does, without a new capture;
* **one graph per batch size**: a graph's shapes are fixed, so an engine captures a few batch sizes and pads
  a batch up to the next one (``captured_size``).

It also keeps a **timeline**, in the record format of ``course_lib.bench.timeline``: each eager launch costs
the host ``LaunchCosts.host_per_launch_s`` and each kernel the GPU its ``kernel_s`` by group; a graph launch
costs the host once and its nodes run back to back, ``graph_node_s`` apart. The costs are parameters, not
measurements: the chapter fills them from the recorded ones and says so.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

CAPTURE_UNSUPPORTED = "cudaErrorStreamCaptureUnsupported"
CAPTURE_INVALIDATED = "cudaErrorStreamCaptureInvalidated"
FIRST_ADDRESS = 0x7F00_0000_0000  # where this model's allocations start; only their differences matter
ALIGNMENT = 256  # cudaMalloc aligns every allocation to at least 256 bytes


class CudaError(RuntimeError):
    """An error CUDA would return, with its name: ``error.code == "cudaErrorStreamCaptureUnsupported"``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class StaleAddressError(RuntimeError):
    """A replay would read a buffer at an address that no longer holds it. CUDA itself does not check this."""


@dataclass(frozen=True)
class LaunchCosts:
    """What the model's timeline charges, in seconds. All zero by default: a timeline of the order alone."""

    host_per_launch_s: float = 0.0  # host time of one eager launch, with the host work around it
    graph_launch_s: float = 0.0  # host time of one graph launch
    graph_node_s: float = 0.0  # GPU time between two nodes of a replayed graph
    kernel_s: Mapping[str, float] = field(default_factory=dict)  # GPU time of one kernel, by group


@dataclass(eq=False)
class Buffer:
    """An allocation: its name, its address, where it lives, and its contents (a NumPy array)."""

    name: str
    array: np.ndarray
    address: int
    memory: str  # "device", "pinned" (page-locked host memory) or "pageable" (ordinary host memory)
    freed: bool = False

    def __repr__(self) -> str:
        return f"<{self.memory} buffer {self.name!r} at {self.address:#x}, {self.array.shape} {self.array.dtype}>"


@dataclass(frozen=True)
class Kernel:
    """A GPU function of the model: ``body`` computes on the arrays of its buffer arguments, in place."""

    name: str
    body: Callable[..., None]
    group: str = "other"  # for the timeline's costs: "projections", "attention", ...


@dataclass(frozen=True)
class KernelNode:
    """A recorded launch: a kernel, its grid and its arguments (buffers, which hold addresses, and scalars)."""

    kernel: Kernel
    grid: int
    args: tuple[Any, ...]

    @property
    def name(self) -> str:
        return self.kernel.name

    def buffers(self) -> list[Buffer]:
        return [arg for arg in self.args if isinstance(arg, Buffer)]

    def run(self) -> None:
        self.kernel.body(*(arg.array if isinstance(arg, Buffer) else arg for arg in self.args))


@dataclass(frozen=True)
class CopyNode:
    """A recorded asynchronous copy between two buffers of the same size."""

    destination: Buffer
    source: Buffer

    @property
    def name(self) -> str:
        return f"copy {self.source.name} -> {self.destination.name}"

    def buffers(self) -> list[Buffer]:
        return [self.destination, self.source]

    def run(self) -> None:
        self.destination.array[...] = self.source.array


Node = KernelNode | CopyNode


class Device:
    """The model's GPU: it hands out addresses, knows which buffer each name points at, and keeps a timeline.

    A name stands for one input: allocating a name again is a reallocation, and a graph captured with the old
    buffer refuses to replay. Give buffers that should coexist different names (``"b4.token_ids"``).
    """

    def __init__(self, costs: LaunchCosts | None = None) -> None:
        self.costs = costs or LaunchCosts()
        self.current: dict[str, Buffer] = {}  # the latest allocation of each name
        self.timeline: list[dict[str, Any]] = []
        self.host_clock_s = self.gpu_clock_s = 0.0
        self._next_address = FIRST_ADDRESS
        self._capturing: set[Stream] = set()

    def malloc(self, name: str, shape: int | Sequence[int], dtype: Any = np.float32) -> Buffer:
        """Device memory, as ``cudaMalloc``: refused while a stream captures, as in CUDA's default capture mode."""
        return self._allocate(name, shape, dtype, "device")

    def host_alloc(self, name: str, shape: int | Sequence[int], dtype: Any = np.float32, pinned: bool = True) -> Buffer:
        """Host memory: pinned (``cudaHostAlloc``, which the GPU can copy from on its own) or pageable."""
        return self._allocate(name, shape, dtype, "pinned" if pinned else "pageable")

    def free(self, buffer: Buffer) -> None:
        self._refuse_while_capturing("cudaFree")
        buffer.freed = True

    def stream(self) -> Stream:
        return Stream(self)

    def clear_timeline(self) -> None:
        self.timeline.clear()
        self.host_clock_s = self.gpu_clock_s = 0.0

    def _allocate(self, name: str, shape: int | Sequence[int], dtype: Any, memory: str) -> Buffer:
        self._refuse_while_capturing("cudaMalloc" if memory == "device" else "cudaHostAlloc")
        buffer = Buffer(name, np.zeros(shape, dtype), self._next_address, memory)
        self._next_address += -(-max(buffer.array.nbytes, 1) // ALIGNMENT) * ALIGNMENT
        self.current[name] = buffer
        return buffer

    def _refuse_while_capturing(self, call: str) -> None:
        for stream in self._capturing:
            stream.invalidate(f"{call} while a stream is capturing: an unsafe call in the default capture mode "
                              "(allocate before capturing, or use cudaMallocAsync, which becomes a graph node)")

    def _record(self, lane: str, name: str, start_s: float, seconds: float) -> float:
        self.timeline.append({"lane": lane, "name": name, "start_us": start_s * 1e6,
                              "end_us": (start_s + seconds) * 1e6})
        return start_s + seconds

    def _execute(self, node: Node, earliest_s: float) -> None:
        """Run ``node`` now and charge the GPU its time, starting no earlier than ``earliest_s``."""
        node.run()
        seconds = self.costs.kernel_s.get(node.kernel.group, 0.0) if isinstance(node, KernelNode) else 0.0
        self.gpu_clock_s = self._record("gpu", node.name, max(self.gpu_clock_s, earliest_s), seconds)


class Stream:
    """An ordered queue of GPU work. Outside a capture each call runs at once; inside one it becomes a node."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._recording: list[Node] | None = None
        self._broken: str | None = None  # why the current capture was invalidated

    @property
    def is_capturing(self) -> bool:
        return self._recording is not None

    def launch(self, kernel: Kernel, grid: int, *args: Any) -> None:
        """Launch ``kernel`` over ``grid`` blocks with ``args`` (buffers and scalars)."""
        self._submit(KernelNode(kernel, grid, args))

    def copy_async(self, destination: Buffer, source: Buffer) -> None:
        """``cudaMemcpyAsync``: from pinned memory the GPU copies on its own, so a capture records it. From
        pageable memory the driver must stage the bytes itself and the host waits: a capture refuses it."""
        if destination.array.shape != source.array.shape or destination.array.dtype != source.array.dtype:
            raise ValueError(f"copy between different shapes or dtypes: {source!r} -> {destination!r}")
        if self.is_capturing and "pageable" in (destination.memory, source.memory):
            self.invalidate(f"an asynchronous copy {source.name} -> {destination.name} touches pageable host "
                            "memory, which would make the host wait; copy through pinned memory instead")
        self._submit(CopyNode(destination, source))

    def read(self, buffer: Buffer) -> np.ndarray:
        """A device buffer's values on the host, as CuPy's ``.get()``: a copy to pageable memory that waits."""
        if self.is_capturing:
            self.invalidate(f"reading {buffer.name!r} back to the host waits for the GPU")
        return buffer.array.copy()

    def synchronize(self) -> None:
        """Wait for the stream's work, as ``cudaStreamSynchronize``; inside a capture there is nothing to wait for."""
        if self.is_capturing:
            self.invalidate("cudaStreamSynchronize on a capturing stream")
        self.device.host_clock_s = max(self.device.host_clock_s, self.device.gpu_clock_s)

    def begin_capture(self) -> None:
        if self.is_capturing:
            raise CudaError("cudaErrorIllegalState", "this stream is capturing already")
        self._recording, self._broken = [], None
        self.device._capturing.add(self)

    def end_capture(self) -> Graph:
        """The recorded graph; ``cudaErrorStreamCaptureInvalidated`` if a refused call broke the capture."""
        if not self.is_capturing:
            raise CudaError("cudaErrorIllegalState", "end_capture without begin_capture")
        nodes, broken = self._recording, self._broken
        self._recording, self._broken = None, None
        self.device._capturing.discard(self)
        if broken:
            raise CudaError(CAPTURE_INVALIDATED, f"the capture was broken by an earlier call: {broken}")
        return Graph(nodes)

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """``with stream.capture() as captured: ...`` records the block; ``captured.graph`` holds the result."""
        captured = Capture()
        self.begin_capture()
        try:
            yield captured
        except BaseException:
            with contextlib.suppress(CudaError):  # end the capture, but report the call that broke it
                self.end_capture()
            raise
        captured.graph = self.end_capture()

    def invalidate(self, why: str) -> None:
        """Break the current capture, as CUDA does on a call it cannot record, and raise that call's error."""
        self._broken = why
        raise CudaError(CAPTURE_UNSUPPORTED, f"operation not permitted when stream is capturing ({why})")

    def _submit(self, node: Node) -> None:
        if self._recording is not None:
            self._recording.append(node)
            return
        device = self.device
        device.host_clock_s = device._record("host", f"launch {node.name}", device.host_clock_s,
                                             device.costs.host_per_launch_s)
        device._execute(node, earliest_s=device.host_clock_s)


@dataclass
class Capture:
    """What ``Stream.capture()`` yields: the graph, once the block has ended."""

    graph: Graph | None = None


@dataclass
class Graph:
    """The nodes a capture recorded, in stream order (each depends on the one before)."""

    nodes: list[Node]

    def kernel_nodes(self, name: str | None = None) -> list[int]:
        """Indices of the kernel nodes (named ``name``, if given): what ``set_kernel_node_params`` takes."""
        return [i for i, node in enumerate(self.nodes)
                if isinstance(node, KernelNode) and name in (None, node.name)]

    def instantiate(self) -> GraphExec:
        return GraphExec(list(self.nodes))


class GraphExec:
    """An instantiated graph: launched as one call; its kernel nodes' parameters can be changed in place."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes  # its own list: editing it leaves the Graph it came from as it was

    def launch(self, stream: Stream) -> None:
        """Run every node in order, as ``cudaGraphLaunch``, once each buffer is checked to be the one captured."""
        device = stream.device
        for index, node in enumerate(self.nodes):
            for buffer in node.buffers():
                _check_still_current(device, index, node, buffer)
        device.host_clock_s = device._record("host", "launch graph", device.host_clock_s, device.costs.graph_launch_s)
        for node in self.nodes:
            device._execute(node, earliest_s=device.host_clock_s)
            device.gpu_clock_s += device.costs.graph_node_s

    def set_kernel_node_params(self, index: int, *args: Any, kernel: Kernel | None = None,
                               grid: int | None = None) -> None:
        """New arguments (and optionally a new kernel or grid) for kernel node ``index``, as
        ``cudaGraphExecKernelNodeSetParams``: the node keeps its place; the graph is not captured again."""
        node = self.nodes[index]
        if not isinstance(node, KernelNode):
            raise CudaError("cudaErrorInvalidValue", f"node {index} ({node.name}) is not a kernel node")
        if len(args) != len(node.args):
            raise CudaError("cudaErrorInvalidValue", f"{node.name} takes {len(node.args)} arguments, got {len(args)}")
        self.nodes[index] = replace(node, args=args, kernel=kernel or node.kernel, grid=grid or node.grid)


def _check_still_current(device: Device, index: int, node: Node, buffer: Buffer) -> None:
    latest = device.current.get(buffer.name)
    if buffer.freed or latest is not buffer:
        where = f"now at {latest.address:#x}" if latest is not None and latest is not buffer else "freed"
        raise StaleAddressError(
            f"node {index} ({node.name}) was captured with {buffer.name!r} at {buffer.address:#x}, but that buffer "
            f"is {where}: the replay would read the old address (CUDA would not tell you). Copy new values into "
            "the captured buffer instead of allocating a new one, or re-point the node (set_kernel_node_params).")


def captured_size(rows: int, sizes: Sequence[int]) -> int:
    """The smallest captured batch size that holds ``rows`` sequences: the graph a batch is padded up to."""
    ordered = sorted(sizes)
    if rows < 1 or not ordered or rows > ordered[-1]:
        raise ValueError(f"a batch of {rows} sequences fits no captured size {ordered}")
    return ordered[bisect_left(ordered, rows)]
