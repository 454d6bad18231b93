"""The engine's fused steps: RoPE with the q/k/v split and the cache write, and SwiGLU's activation.

A Llama layer computes q, k and v with one projection (their weights stacked) and gate and up with
another; these functions take those stacked outputs apart in the same pass that transforms them (the
kernels are in ``fused.cu``). On a GPU they launch one kernel each; in CPU mode they compute the same
thing with NumPy, in fp32, rounded once to the element type.

* ``rope_write_kv(qkv, positions, frequencies, num_heads, key_cache, value_cache, slot_mapping)``:
  ``qkv`` [tokens, (heads + 2 kv_heads) * head_dim] -> q [tokens, heads, head_dim] rotated by its token's
  position; k rotated and v unchanged go straight into the paged KV cache at each token's slot (the cache
  write of ``paged_attention.write_kv``, without k and v ever being arrays of their own). It checks its
  inputs, the slots on the host; ``rope_write_kv_unchecked`` only runs, for an engine that checked its
  step's slots once for all its layers;
* ``silu_mul(gate_up)``: ``gate_up`` [tokens, 2 * inner] -> silu(gate) * up [tokens, inner].
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile
from course_lib.kernels import paged_attention
from course_lib.kernels import paged_attention_reference as reference

SOURCE = "fused.cu"
THREADS = 256
MAX_THREADS = 1024
MAX_BLOCKS = 65_535  # silu_mul's grid-stride loop covers any size with at most this many blocks


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def rope_write_kv(qkv: Any, positions: Any, frequencies: Any, num_heads: int, key_cache: Any, value_cache: Any,
                  slot_mapping: Any, dtype: str | None = None) -> Any:
    """RoPE with the q/k/v split and the cache write: returns q, stores k and v in the caches.

    ``qkv`` [tokens, (heads + 2 kv_heads) * head_dim] (the stacked projection) -> q [tokens, heads, head_dim]
    rotated by each token's position (``positions`` int32 [tokens]; ``frequencies`` float32 [head_dim / 2],
    the angle per unit of position); k rotated and v as is, stored in ``key_cache`` and ``value_cache``
    [num_blocks, kv_heads, block_size, head_dim] at each token's slot of ``slot_mapping`` (int32; -1: a
    padding token, not stored). Every input is checked first, the slots on the host.
    """
    paged_attention.require_device_arrays({"qkv": qkv, "positions": positions, "frequencies": frequencies,
                                           "key_cache": key_cache, "value_cache": value_cache})
    cache = paged_attention.check_cache(key_cache, value_cache, dtype)
    half = cache.head_dim // 2
    _require(isinstance(num_heads, int) and num_heads >= 1, f"num_heads must be a positive int, got {num_heads!r}")
    tokens, width = int(qkv.shape[0]), (num_heads + 2 * cache.num_kv_heads) * cache.head_dim
    _require(dtypes.element_type(qkv, dtype) == cache.dtype,
             f"qkv must hold {cache.dtype} like the cache, got {qkv.dtype}")
    _require(qkv.ndim == 2 and qkv.shape[1] == width, f"qkv must be [tokens, (num_heads + 2 num_kv_heads) * "
             f"head_dim] = [tokens, {width}], got {tuple(qkv.shape)}")
    _require(positions.shape == (tokens,) and str(positions.dtype) == "int32",
             f"positions must be int32 [{tokens}] (one per token), got {positions.dtype} {tuple(positions.shape)}")
    _require(str(frequencies.dtype) == "float32" and frequencies.shape == (half,),
             f"frequencies must be float32 [{half}] (head_dim / 2), got {frequencies.dtype} {tuple(frequencies.shape)}")
    paged_attention.check_slots(slot_mapping, tokens, cache)
    return rope_write_kv_unchecked(qkv, positions, frequencies, num_heads, key_cache, value_cache, slot_mapping,
                                   cache.dtype)


def rope_write_kv_unchecked(qkv: Any, positions: Any, frequencies: Any, num_heads: int, key_cache: Any,
                            value_cache: Any, slot_mapping: Any, dtype: str | None = None) -> Any:
    """:func:`rope_write_kv` on arrays the caller has checked: nothing is checked or read back to the host.

    For an engine, which checks its step's slots once on the host and then runs every layer on them (a CUDA
    graph capture could not read them back at all).
    """
    kind = dtypes.element_type(key_cache, dtype)
    _, num_kv_heads, block_size, head_dim = (int(n) for n in key_cache.shape)
    tokens = int(qkv.shape[0])
    q = dtypes.empty((tokens, num_heads, head_dim), kind)
    if not backend.has_gpu():
        rotated, key, value = _rope_numpy(qkv, positions, frequencies, num_heads, num_kv_heads, kind)
        q[...] = rotated
        reference.scatter(key_cache, key, slot_mapping)
        reference.scatter(value_cache, value, slot_mapping)
    elif tokens:
        _kernel(f"rope_write_kv<{dtypes.CUDA_TYPES[kind]}>")(
            (tokens,), (_rope_threads(num_heads + 2 * num_kv_heads, head_dim // 2),),
            (q, key_cache, value_cache, qkv, positions, frequencies, slot_mapping, np.int32(num_heads),
             np.int32(num_kv_heads), np.int32(head_dim), np.int32(block_size)))
    return q


def _rope_numpy(qkv: np.ndarray, positions: np.ndarray, frequencies: np.ndarray, num_heads: int, num_kv_heads: int,
                kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q and k rotated, and v, in fp32 and rounded once to ``kind``: rope_write_kv's arithmetic in NumPy."""
    tokens, half = qkv.shape[0], frequencies.shape[0]
    heads = dtypes.widen(qkv, kind).reshape(tokens, num_heads + 2 * num_kv_heads, 2 * half)
    angles = positions.astype(np.float32)[:, None, None] * frequencies[None, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = heads[..., :half], heads[..., half:]
    rotated = dtypes.narrow(np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1), kind)
    value = qkv.reshape(heads.shape)[:, num_heads + num_kv_heads:]
    return rotated[:, :num_heads], rotated[:, num_heads:num_heads + num_kv_heads], value


def _rope_threads(all_heads: int, half: int) -> int:
    """One thread per (head, pair) where a block holds them all: at batch 1 rope_write_kv is a single block, and
    a thread looping over several pairs would wait for one memory round trip after another."""
    return min(MAX_THREADS, 32 * -(-all_heads * half // 32))


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


def rope_reference(x: np.ndarray, positions: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
    """RoPE in float64 on [tokens, heads, head_dim], as Hugging Face's Llama writes it (rotate_half).

    ``frequencies`` are the ``head_dim / 2`` angles per unit of position (the model's RoPE inverse frequencies).
    """
    half = x.shape[-1] // 2
    angles = positions.astype(np.float64)[:, None, None] * frequencies[None, None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def kernel_names() -> tuple[str, ...]:
    return tuple(f"{name}<{cuda}>" for name in ("rope_write_kv", "silu_mul") for cuda in dtypes.CUDA_TYPES.values())


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


def _kernel(name: str) -> Any:
    return _module().get_function(name)
