"""cuBLASLt, the library under cuBLAS, through nvmath-python: plan a matrix product once, run it many times.

``LtMatmul(a, b, epilogue=..., bias=...)`` computes ``C = epilogue(a @ b + bias)`` for row-major ``a`` [M, K] and
``b`` [K, N] of float16 or bfloat16, accumulating in fp32. Building it asks cuBLASLt's heuristic once for candidate
algorithms (tile shape, pipeline stages, split-K); each call then only launches. nvmath-python's one-shot ``matmul``
plans again on every call, a host cost paid on every product: an engine plans once per shape.

Three details a learner meets here:

* **Row-major data, a column-major library.** cuBLASLt's bias epilogue adds one value per row of its column-major
  result; a linear layer's bias holds one value per output feature, a *column* of our row-major C. So the product
  is planned transposed, ``C^T = b^T @ a^T``: the transposes are the same memory read column-major (no copies), and
  C^T written column-major is C row-major. The bias then lands on C's columns, where it belongs.
* **bfloat16.** The course keeps bf16 on the GPU as uint16 bits (``course_lib.dtypes``). CuPy 14 accepts
  ml_dtypes' bfloat16 as the dtype of a *view*, and nvmath-python reads the dtype by name, so a view of the same
  bits is all cuBLASLt needs: no copy, no PyTorch.
* **GELU.** cuBLASLt's GELU epilogue is the tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), not the
  erf form (they differ by up to ~5e-4); ``reference`` computes the same function.

C is written into ``out``, which the object owns: a call allocates nothing, as an engine's preallocated activations,
and so it can be captured in a CUDA graph. In CPU mode the class computes the same function with NumPy in float32
and says so (``engine``), so the chapters run on a laptop; nvmath-python is imported only on a GPU.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.kernels.gemm import Product, check_operands, gemm_reference

# The course's epilogue names and the nvmath.linalg.advanced.MatmulEpilog member each one stands for.
EPILOGUES = {"relu": "RELU", "gelu": "GELU", "bias": "BIAS", "bias_relu": "RELU_BIAS", "bias_gelu": "GELU_BIAS"}
ELEMENT_TYPES = ("float16", "bfloat16")
CANDIDATES = 8  # algorithms the heuristic proposes by default (nvmath-python's default too)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU as cuBLASLt's epilogue computes it: the tanh approximation (in x's float type)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _apply_epilogue(x: np.ndarray, epilogue: str | None, bias: np.ndarray | None) -> np.ndarray:
    """``epilogue(x + bias)`` on the host: the bias is added to every row, then ReLU or GELU if named."""
    if bias is not None:
        x = x + bias
    if epilogue in ("relu", "bias_relu"):
        return np.maximum(x, 0.0)
    if epilogue in ("gelu", "bias_gelu"):
        return gelu_tanh(x)
    return x


def _check_epilogue(epilogue: str | None, bias: Any) -> None:
    if epilogue is not None and epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be None or one of {tuple(EPILOGUES)}, got {epilogue!r}")
    adds_bias = epilogue is not None and epilogue.startswith("bias")
    if adds_bias and bias is None:
        raise ValueError(f"epilogue {epilogue!r} adds a bias: pass bias=, a vector of length N")
    if bias is not None and not adds_bias:
        raise ValueError(f"bias is used only by the 'bias', 'bias_relu' and 'bias_gelu' epilogues, "
                         f"got epilogue={epilogue!r}")


def reference(a: Any, b: Any, epilogue: str | None = None, bias: Any = None, dtype: str | None = None) -> np.ndarray:
    """``epilogue(a @ b + bias)`` in float64 on the host: the ground truth for LtMatmul."""
    _check_epilogue(epilogue, bias)
    host_bias = None if bias is None else dtypes.to_float32(bias, dtype).astype(np.float64)
    return _apply_epilogue(gemm_reference(a, b, dtype), epilogue, host_bias)


def check_inputs(a: Any, b: Any, epilogue: str | None = None, bias: Any = None, dtype: str | None = None) -> Product:
    """Validate operands, epilogue and bias before anything reaches cuBLASLt; say what was expected."""
    _check_epilogue(epilogue, bias)
    product = check_operands(a, b, dtype)
    kind, n = product.dtype, product.n
    if kind not in ELEMENT_TYPES:
        raise TypeError(f"LtMatmul takes the tensor-core types {ELEMENT_TYPES}, got {kind}")
    if bias is not None:
        dtypes.require_device_array("bias", bias)
        if dtypes.element_type(bias, dtype) != kind:
            raise TypeError(f"bias must hold the operands' element type {kind}, got {bias.dtype}")
        if tuple(bias.shape) != (n,) or not bias.flags.c_contiguous:
            raise ValueError(f"bias must be a contiguous vector of shape ({n},), one value per output column, "
                             f"got shape {tuple(bias.shape)}")
    return product


def _library_view(array: Any, kind: str) -> Any:
    """The array as nvmath-python must see it: bf16 bits viewed as ml_dtypes' bfloat16 (the same memory)."""
    return array.view(dtypes.bfloat16) if kind == "bfloat16" else array


def describe(algorithm: Any) -> dict[str, Any]:
    """A cuBLASLt algorithm in numbers a results file can keep: its id, tile, stages and split-K."""

    def dims(value: Any) -> str:
        return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return {"id": int(algorithm.algorithm_id), "tile": dims(algorithm.tile), "stages": dims(algorithm.stages),
            "split_k": int(algorithm.split_k)}


_THREAD = threading.local()


def _name_the_device_in_this_thread() -> None:
    """nvmath runs on cuda.core, which keeps a current device per thread and refuses a thread that never named
    one. A plan built on one thread and run on another (a checker's worker thread, a rank of ``run_ranks``)
    needs this first; once per thread is enough."""
    if not getattr(_THREAD, "device_named", False):
        from cuda.core import Device

        Device(backend.xp.cuda.Device().id).set_current()
        _THREAD.device_named = True


class LtMatmul:
    """``C = epilogue(a @ b + bias)``, planned once with cuBLASLt and launched on every call.

    ``out`` holds C [M, N] (uint16 bits for bf16 on the GPU); each call overwrites it and returns it.
    ``algorithms`` are the planned candidates, best-ranked first; calls use the first unless ``choose`` picks
    another. Use it as a context manager, or call ``close()``, to release cuBLASLt's descriptors and workspace.
    """

    def __init__(self, a: Any, b: Any, *, epilogue: str | None = None, bias: Any = None,
                 dtype: str | None = None) -> None:
        self.product = check_inputs(a, b, epilogue, bias, dtype)
        self.a, self.b, self.bias, self.epilogue = a, b, bias, epilogue
        self.out = dtypes.empty((self.product.m, self.product.n), self.product.dtype)
        self.algorithms: tuple[Any, ...] = ()
        self._chosen = None  # None: the first of ``algorithms``
        self._closed = False
        self._captured = False  # has an execute been captured into a CUDA graph?
        self._matmul = self._specify() if backend.has_gpu() else None
        if self._matmul is not None:
            self.plan()

    @property
    def engine(self) -> str:
        """What computes C in this process: cuBLASLt on a GPU, NumPy in CPU mode."""
        if backend.has_gpu():
            import nvmath

            return f"cuBLASLt through nvmath-python {nvmath.__version__}"
        return "NumPy float32 (CPU mode: no cuBLASLt without a GPU)"

    def __repr__(self) -> str:
        p = self.product
        return (f"LtMatmul([{p.m}, {p.k}] @ [{p.k}, {p.n}] {p.dtype}, epilogue={self.epilogue!r}, "
                f"engine={self.engine!r})")

    def _specify(self) -> Any:
        """The nvmath Matmul for ``C^T = b^T @ a^T``, written in place into ``out^T`` (see the module docstring)."""
        from nvmath.linalg.advanced import Matmul

        _name_the_device_in_this_thread()
        kind = self.product.dtype
        return Matmul(_library_view(self.b, kind).T, _library_view(self.a, kind).T,
                      c=_library_view(self.out, kind).T, beta=0.0, options={"inplace": True})

    def _require_gpu(self, what: str) -> None:
        if self._closed:
            raise RuntimeError("this LtMatmul is closed; build a new one")
        if self._matmul is None:
            raise RuntimeError(f"{what} needs cuBLASLt on a GPU; here LtMatmul computes with NumPy "
                               f"({backend.mode_text()})")
        _name_the_device_in_this_thread()

    def plan(self, limit: int = CANDIDATES) -> tuple[Any, ...]:
        """Ask cuBLASLt's heuristic for up to ``limit`` algorithms for this problem, best-ranked first."""
        self._require_gpu("plan")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        from nvmath.linalg.advanced import MatmulEpilog

        kind = self.product.dtype
        epilog = None if self.epilogue is None else getattr(MatmulEpilog, EPILOGUES[self.epilogue])
        inputs = None if self.bias is None else {"bias": _library_view(self.bias, kind)}
        self.algorithms = tuple(self._matmul.plan(preferences={"limit": limit}, epilog=epilog, epilog_inputs=inputs))
        self._chosen = None
        return self.algorithms

    def autotune(self, iterations: int = 10) -> tuple[Any, ...]:
        """Time every planned algorithm on these operands and reorder ``algorithms`` fastest first."""
        self._require_gpu("autotune")
        self._matmul.autotune(iterations=iterations)
        self.algorithms = tuple(self._matmul.algorithms)
        self._chosen = None
        return self.algorithms

    def choose(self, index: int) -> Any:
        """Make later calls use ``algorithms[index]``: to time the candidates the heuristic ranked lower."""
        self._require_gpu("choose")
        if not 0 <= index < len(self.algorithms):
            raise IndexError(f"index must be in [0, {len(self.algorithms)}), got {index}")
        self._chosen = self.algorithms[index]
        return self._chosen

    def __call__(self, a: Any = None, b: Any = None) -> Any:
        """Compute C into ``out`` and return it.

        ``a`` or ``b`` swap in new operands of the planned shape and type: an engine plans once per shape and runs
        every layer's weights through that plan.
        """
        if self._closed:
            raise RuntimeError("this LtMatmul is closed; build a new one")
        if a is not None or b is not None:
            self._rebind(self.a if a is None else a, self.b if b is None else b)
        if self._matmul is None:
            return self._compute_with_numpy()
        _name_the_device_in_this_thread()
        stream = backend.xp.cuda.get_current_stream()
        self._matmul.execute(algorithm=self._chosen, stream=stream)
        self._captured = self._captured or stream.is_capturing()
        return self.out

    def _rebind(self, a: Any, b: Any) -> None:
        product = check_inputs(a, b, self.epilogue, self.bias, self.product.dtype)
        if product != self.product:
            raise ValueError(f"new operands must keep the planned problem {self.product}, got {product}")
        self.a, self.b = a, b
        if self._matmul is not None:
            kind = product.dtype
            self._matmul.reset_operands(a=_library_view(b, kind).T, b=_library_view(a, kind).T)

    def _compute_with_numpy(self) -> Any:
        """CPU mode: the same function in float32, rounded once to the element type."""
        kind = self.product.dtype
        bias = None if self.bias is None else dtypes.to_float32(self.bias, kind)
        product = dtypes.to_float32(self.a, kind) @ dtypes.to_float32(self.b, kind)
        self.out[...] = _apply_epilogue(product, self.epilogue, bias).astype(self.out.dtype)
        return self.out

    def close(self) -> None:
        """Release cuBLASLt's descriptors and workspace; the object cannot run afterwards."""
        if self._matmul is not None:
            _name_the_device_in_this_thread()
            if self._captured:
                # nvmath frees its workspace after the event of the last execute; an execute captured into a
                # CUDA graph recorded that event only inside the graph, so run once for real first.
                self._matmul.execute(algorithm=self._chosen, stream=backend.xp.cuda.get_current_stream())
                backend.synchronize()
            self._matmul.free()
        self._matmul = None
        self._closed = True

    def __enter__(self) -> LtMatmul:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
