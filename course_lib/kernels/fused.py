"""The engine's fused elementwise steps: rotary embedding with the q/k/v split, and SwiGLU's activation.

A Llama layer computes q, k and v with one projection (their weights stacked) and gate and up with
another; these functions take those stacked outputs apart in the same pass that transforms them (the
kernels are in ``fused.cu``). On a GPU they launch one kernel each; in CPU mode they compute the same
thing with NumPy, in fp32, rounded once to the element type.

* ``rope_split(qkv, positions, inverse_frequencies, num_heads, num_kv_heads)``: ``qkv`` [tokens,
  (heads + 2 kv_heads) * head_dim] -> q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim]
  rotated by their token's position, v [tokens, kv_heads, head_dim] unchanged;
* ``silu_mul(gate_up)``: ``gate_up`` [tokens, 2 * inner] -> silu(gate) * up [tokens, inner].
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile

SOURCE = "fused.cu"
THREADS = 256
MAX_BLOCKS = 65_535  # silu_mul's grid-stride loop covers any size with at most this many blocks


def inverse_frequencies(head_dim: int, theta: float) -> Any:
    """RoPE's ``theta ** (-2i / head_dim)`` for the ``head_dim / 2`` pairs, float32 on the device."""
    xp = backend.xp
    return (1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=xp.float32) / head_dim)).astype(xp.float32)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def rope_split(qkv: Any, positions: Any, frequencies: Any, num_heads: int, num_kv_heads: int,
               dtype: str | None = None) -> tuple[Any, Any, Any]:
    """q and k rotated by their token's position, and v, from one stacked projection (see the module docstring)."""
    kind = dtypes.element_type(qkv, dtype)
    for name, array in (("qkv", qkv), ("positions", positions), ("frequencies", frequencies)):
        dtypes.require_device_array(name, array)
        _require(array.flags.c_contiguous, f"{name} must be C-contiguous")
    half = int(frequencies.shape[0])
    head_dim, tokens = 2 * half, int(qkv.shape[0])
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _require(qkv.ndim == 2 and qkv.shape[1] == width, f"qkv must be [tokens, (num_heads + 2 num_kv_heads) * "
             f"head_dim] = [tokens, {width}], got {tuple(qkv.shape)}")
    _require(positions.shape == (tokens,) and str(positions.dtype) == "int32",
             f"positions must be int32 [{tokens}] (one per token), got {positions.dtype} {tuple(positions.shape)}")
    _require(str(frequencies.dtype) == "float32", f"frequencies must be float32, got {frequencies.dtype}")
    q, k, v = (dtypes.empty((tokens, heads, head_dim), kind) for heads in (num_heads, num_kv_heads, num_kv_heads))
    if backend.has_gpu():
        if tokens:
            _kernel(f"rope_split<{dtypes.CUDA_TYPES[kind]}>")(
                (tokens,), (THREADS,), (q, k, v, qkv, positions, frequencies, np.int32(num_heads),
                                        np.int32(num_kv_heads), np.int32(head_dim)))
        return q, k, v
    heads = dtypes.widen(qkv, kind).reshape(tokens, num_heads + 2 * num_kv_heads, head_dim)
    angles = positions.astype(np.float32)[:, None, None] * frequencies[None, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = heads[..., :half], heads[..., half:]
    rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    q[...] = dtypes.narrow(rotated[:, :num_heads], kind)
    k[...] = dtypes.narrow(rotated[:, num_heads:num_heads + num_kv_heads], kind)
    v[...] = qkv.reshape(tokens, num_heads + 2 * num_kv_heads, head_dim)[:, num_heads + num_kv_heads:]
    return q, k, v


def silu_mul(gate_up: Any, dtype: str | None = None) -> Any:
    """``silu(gate) * up`` [tokens, inner] from one stacked projection [tokens, 2 * inner] (gate first)."""
    kind = dtypes.element_type(gate_up, dtype)
    dtypes.require_device_array("gate_up", gate_up)
    _require(gate_up.ndim == 2 and gate_up.shape[1] % 2 == 0 and gate_up.flags.c_contiguous,
             f"gate_up must be C-contiguous [tokens, 2 * inner], got {tuple(gate_up.shape)}")
    tokens, inner = int(gate_up.shape[0]), int(gate_up.shape[1]) // 2
    out = dtypes.empty((tokens, inner), kind)
    if backend.has_gpu():
        if out.size:
            blocks = min(MAX_BLOCKS, -(-out.size // THREADS))
            _kernel(f"silu_mul<{dtypes.CUDA_TYPES[kind]}>")((blocks,), (THREADS,),
                                                            (out, gate_up, np.int32(tokens), np.int32(inner)))
        return out
    values = dtypes.widen(gate_up, kind)
    gate, up = values[:, :inner], values[:, inner:]
    out[...] = dtypes.narrow(gate / (1 + np.exp(-gate)) * up, kind)
    return out


def rope_reference(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """RoPE in float64 on [tokens, heads, head_dim], as Hugging Face's Llama writes it (rotate_half)."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-np.arange(0, x.shape[-1], 2, dtype=np.float64) / x.shape[-1])
    angles = positions.astype(np.float64)[:, None, None] * frequencies[None, None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def kernel_names() -> tuple[str, ...]:
    return tuple(f"{name}<{cuda}>" for name in ("rope_split", "silu_mul") for cuda in dtypes.CUDA_TYPES.values())


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


def _kernel(name: str) -> Any:
    return _module().get_function(name)
