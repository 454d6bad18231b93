"""Matrix-vector products for steps of one token, with the norm, the activation or the residual add fused in.

At one token per step a Llama layer's four projections are matrix-vector products, and around them sit two
RMSNorms, a SwiGLU activation and two residual adds: kernels that move a few kilobytes each, yet cost a
launch and a chain of memory latencies. The kernels of ``matvec.cu`` fold each of those steps into the
product next to it, so a layer is seven kernels (four products, the rotary embedding, attention and its merge)
instead of ten:

* ``normed_matvec(x, norm_weight, weight, eps)``: ``weight @ rms_norm(x)``, the projections that follow a
  norm (q/k/v, gate/up, and the logits with ``float32_out``);
* ``add_matvec(residual, x, weight)``: ``residual += weight @ x``, the projections whose output joins the
  residual stream (o, and down with ``activation="silu_mul"``, which takes the stacked gate/up output).

``x`` is one token, ``[1, k]``; ``weight`` is ``[n, k]`` row-major, as Hugging Face stores a linear layer. The
values feeding a product are rounded to the element type where the unfused kernels round them, so the fused
path computes the same function as ``rms_norm``, ``silu_mul``, ``linear`` and ``add_rms_norm`` in sequence, up
to the order of the sums and last-bit differences (the kernel's ``rsqrtf``). In CPU mode NumPy computes it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile

SOURCE = "matvec.cu"
PACK_BYTES = 16  # a thread loads 16 bytes of a row at a time
ROWS, THREADS = 16, 512  # outputs and threads per block: keep equal to matvec::ROWS and matvec::THREADS
SHARED_BYTES = 32 * 1024  # the input row sits in shared memory: well under the 48 KiB a block gets by default
INPUTS = {"plain": "PLAIN", "rms_norm": "RMS_NORM", "silu_mul": "SILU_MUL"}
ACTIVATIONS = (None, "silu_mul")


def max_row_length(dtype: str) -> int:
    """The longest row ``k`` the kernels take: the product's input is kept in shared memory."""
    return SHARED_BYTES // dtypes.ITEM_BYTES[dtype]


def supports(k: int, dtype: str) -> bool:
    """Can the kernels multiply rows of ``k`` elements of ``dtype``: whole 16-byte packs, not too long."""
    return k % (PACK_BYTES // dtypes.ITEM_BYTES[dtype]) == 0 and 0 < k <= max_row_length(dtype)


# ---- input checks: a bad shape or type is a clear error here, never an out-of-bounds read ------------------


@dataclass(frozen=True)
class Product:
    """A validated matrix-vector product: ``n`` outputs from rows of ``k`` elements."""

    dtype: str
    n: int
    k: int


def check_inputs(x: Any, weight: Any, dtype: str | None, *, x_width: int = 1, norm_weight: Any = None,
                 residual: Any = None) -> Product:
    """``weight`` [n, k], ``x`` [1, x_width * k], and ``norm_weight`` [k] or ``residual`` [1, n] when given: device
    arrays of one element type, C-contiguous, 16-byte aligned, with rows the kernels take (:func:`supports`)."""
    dtypes.require_device_array("weight", weight)
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise ValueError(f"weight must be a 2-D [n, k] array with n, k >= 1, got shape {tuple(weight.shape)}")
    kind = dtypes.element_type(weight, dtype)
    n, k = (int(size) for size in weight.shape)
    expected = {"x": (x, (1, x_width * k)), "norm_weight": (norm_weight, (k,)), "residual": (residual, (1, n))}
    arrays = {name: array for name, (array, _) in expected.items() if array is not None}
    for name, array in arrays.items():
        dtypes.require_device_array(name, array)
        if tuple(array.shape) != expected[name][1]:
            raise ValueError(f"{name} must have shape {expected[name][1]} for a weight of shape {(n, k)} (one token), "
                             f"got {tuple(array.shape)}")
    for name, array in {**arrays, "weight": weight}.items():
        if dtypes.element_type(array, dtype) != kind:
            raise TypeError(f"{name} must hold {kind} like weight, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if backend.has_gpu() and array.data.ptr % PACK_BYTES:
            raise ValueError(f"{name} must start on a 16-byte boundary (the kernels load 16 bytes at a time)")
    if residual is not None and any(_overlap(residual, other) for other in (x, weight)):
        raise ValueError("residual must not overlap x or weight: the kernel writes it while other blocks still read")
    if not supports(k, kind):
        raise ValueError(f"matvec takes rows of a multiple of {PACK_BYTES // dtypes.ITEM_BYTES[kind]} {kind} elements, "
                         f"at most {max_row_length(kind)}, got k={k}; use course_lib.engine.linear for this shape")
    return Product(kind, n, k)


def _overlap(a: Any, b: Any) -> bool:
    """Do two C-contiguous arrays share bytes? From their addresses alone: no device work, so the check may run
    while a CUDA graph is being captured."""
    if not backend.has_gpu():
        return bool(np.may_share_memory(a, b))
    return a.data.ptr < b.data.ptr + b.nbytes and b.data.ptr < a.data.ptr + a.nbytes


# ---- the public functions ------------------------------------------------------------------------------


def normed_matvec(x: Any, norm_weight: Any, weight: Any, eps: float, *, dtype: str | None = None,
                  float32_out: bool = False) -> Any:
    """``weight @ rms_norm(x, norm_weight, eps)`` for one token: [1, n], in x's type or float32 (the logits)."""
    product = check_inputs(x, weight, dtype, norm_weight=norm_weight)
    out = dtypes.empty((1, product.n), "float32" if float32_out else product.dtype)
    if backend.has_gpu():
        _launch(product, "rms_norm", False, out, weight, x, norm_weight, eps)
    else:
        kind = product.dtype
        values = dtypes.widen(x, kind)
        normed = values / np.sqrt(np.mean(values * values, axis=-1, keepdims=True) + np.float32(eps))
        result = _rounded(normed * dtypes.widen(norm_weight, kind), kind) @ dtypes.widen(weight, kind).T
        out[...] = result if float32_out else dtypes.narrow(result, kind)
    return out


def add_matvec(residual: Any, x: Any, weight: Any, *, activation: str | None = None,
               dtype: str | None = None) -> Any:
    """``residual += weight @ x`` in place for one token, and return ``residual`` [1, n].

    ``activation="silu_mul"`` takes ``x`` as the stacked gate/up projection [1, 2k] and multiplies
    ``silu(gate) * up``: the MLP's down projection.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    product = check_inputs(x, weight, dtype, x_width=2 if activation else 1, residual=residual)
    if backend.has_gpu():
        _launch(product, activation or "plain", True, residual, weight, x, x, 0.0)
    else:
        kind, values = product.dtype, dtypes.widen(x, product.dtype)
        if activation:
            gate, up = values[:, :product.k], values[:, product.k:]
            values = _rounded(gate / (1 + np.exp(-gate)) * up, kind)
        result = _rounded(values @ dtypes.widen(weight, kind).T, kind)
        residual[...] = dtypes.narrow(result + dtypes.widen(residual, kind), kind)
    return residual


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` rounded to ``dtype`` and back: what a kernel storing them in ``dtype`` would read."""
    return dtypes.widen(dtypes.narrow(values, dtype), dtype)


# ---- the launch ----------------------------------------------------------------------------------------


def kernel_name(dtype: str, input_kind: str, add: bool, float32_out: bool = False) -> str:
    """The instantiation of ``matvec_kernel`` in matvec.cu for these choices."""
    cuda_type = dtypes.CUDA_TYPES[dtype]
    out_type = "float" if float32_out else cuda_type
    return f"matvec_kernel<{cuda_type}, {out_type}, matvec::{INPUTS[input_kind]}, {str(add).lower()}>"


def kernel_names() -> tuple[str, ...]:
    """Every instantiation in matvec.cu, as name expressions."""
    names = []
    for dtype in dtypes.ELEMENT_TYPES:
        names += [kernel_name(dtype, "plain", True), kernel_name(dtype, "silu_mul", True),
                  kernel_name(dtype, "rms_norm", False)]
        if dtype != "float32":
            names.append(kernel_name(dtype, "rms_norm", False, float32_out=True))
    return tuple(names)


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


def _launch(product: Product, input_kind: str, add: bool, out: Any, weight: Any, x: Any, norm_weight: Any,
            eps: float) -> None:
    """One block per ROWS outputs; the input row in dynamic shared memory."""
    float32_out = str(out.dtype) == "float32" and product.dtype != "float32"
    kernel = _module().get_function(kernel_name(product.dtype, input_kind, add, float32_out))
    kernel((-(-product.n // ROWS),), (THREADS,),
           (out, weight, x, norm_weight, np.float32(eps), np.int32(product.n), np.int32(product.k)),
           shared_mem=product.k * dtypes.ITEM_BYTES[product.dtype])
