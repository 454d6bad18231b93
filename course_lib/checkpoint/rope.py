"""RoPE's frequencies: which angle each pair of features turns by, per position, and how configs name them.

Rotary position embedding turns feature pair ``i`` of every query and key head (features ``i`` and
``i + head_dim / 2``, Hugging Face's "rotate half" layout) by the angle ``position * f_i``, with
``f_i = theta ** (-2i / head_dim)``. Pair 0 turns by one radian a token; the last pair's wavelength
``2 pi / f_i`` is close to ``theta`` tokens. A dot product of a rotated query and key then depends on
how far apart they are, not on where they are. The kernels only ever see the ``head_dim / 2``
frequencies: every RoPE variant in this file is a different list of frequencies, the same kernel.

* ``default``: ``theta ** (-2i / head_dim)``. ``theta`` is the field that matters most: Llama 2 has
  10 000, Llama 3 500 000, SmolLM2 100 000. A loader that misses it runs the model with the wrong
  angles: the logits look plausible and drift further from the right ones as positions grow.
* ``llama3`` (Llama 3.1 and later): the model was trained on ``original_max_position_embeddings`` tokens,
  then stretched ``factor`` times. Pairs whose wavelength is shorter than ``original / high_freq_factor``
  keep their frequency (they turn many times inside the old context: position is already clear); pairs
  whose wavelength is longer than ``original / low_freq_factor`` are slowed ``factor`` times (so angles at
  the new length stay inside what training saw); pairs in between blend the two smoothly.

Configs spell all this two ways. ``config.json`` from transformers 4 has a top-level ``rope_theta`` and a
``rope_scaling`` dict (``None`` for default); transformers 5 writes one ``rope_parameters`` dict holding
``rope_type``, ``rope_theta`` and the scaling fields. ``from_hf`` reads both; anything else is refused by
name, because a silently ignored RoPE field gives a model that runs and is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_THETA = 10000.0
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE scaling: slow the low frequencies ``factor`` times, keep the high ones, blend between.

    ``ModelConfig`` checks the values when a config holds them.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **{name: getattr(self, name) for name in LLAMA3_FIELDS}}


def inverse_frequencies(head_dim: int, theta: float, scaling: Llama3Scaling | None = None) -> np.ndarray:
    """The ``head_dim / 2`` angles a token turns each feature pair by, in float64 (kernels take them as float32)."""
    frequencies = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return frequencies
    wavelengths = 2 * math.pi / frequencies
    original = scaling.original_max_position_embeddings
    slowed = frequencies / scaling.factor
    # 0 where the wavelength reaches original / low_freq_factor (slow fully), 1 at original / high_freq_factor (keep)
    blend = (original / wavelengths - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * slowed + blend * frequencies
    long_waves = wavelengths > original / scaling.low_freq_factor
    short_waves = wavelengths < original / scaling.high_freq_factor
    return np.where(short_waves, frequencies, np.where(long_waves, slowed, blended))


def from_hf(hf: dict[str, Any]) -> tuple[float, Llama3Scaling | None]:
    """``(theta, scaling)`` from a ``config.json`` of either style; refuses any RoPE it does not implement.

    Where a config has both spellings (a file edited by hand, or converted), they must agree.
    """
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={hf['partial_rotary_factor']!r} is not supported: this engine "
                         f"rotates every feature of a head")
    legacy = (hf.get("rope_theta", DEFAULT_THETA), _scaling(hf.get("rope_scaling"), "rope_scaling"))
    parameters = hf.get("rope_parameters")
    if parameters is None:  # transformers 4
        return legacy
    if not isinstance(parameters, dict):
        raise ValueError(f"rope_parameters must be a dict, got {parameters!r}")
    current = (parameters.get("rope_theta", legacy[0]), _scaling(parameters, "rope_parameters", ignore=("rope_theta",)))
    given_legacy = {key: hf[key] for key in ("rope_theta", "rope_scaling") if hf.get(key) is not None}
    if given_legacy and legacy != current:
        raise ValueError(f"the config's rope_parameters {parameters} disagree with its {given_legacy}")
    return current


def to_hf(theta: float, scaling: Llama3Scaling | None) -> dict[str, Any]:
    """The transformers 5 spelling: ``{"rope_parameters": {...}}``."""
    fields = scaling.to_hf() if scaling else {"rope_type": "default"}
    return {"rope_parameters": {**fields, "rope_theta": theta}}


def _scaling(fields: dict[str, Any] | None, where: str, ignore: tuple[str, ...] = ()) -> Llama3Scaling | None:
    """The scaling a ``rope_type`` names (the legacy key ``type`` is read too); unknown fields are refused."""
    if fields is None:
        return None
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be null or a dict, got {fields!r}")
    fields = {name: value for name, value in fields.items() if name not in ignore and value is not None}
    rope_type = fields.pop("rope_type", None) or fields.pop("type", None) or "default"
    fields.pop("type", None)
    if rope_type == "default":
        if fields:
            raise ValueError(f"{where}: rope_type 'default' takes no other fields, got {fields}")
        return None
    if rope_type != "llama3":
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported by this engine (it implements "
                         f"'default' and 'llama3')")
    missing = [name for name in LLAMA3_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    unknown = sorted(name for name, value in fields.items()
                     if name not in LLAMA3_FIELDS and not (name == "attention_factor" and value == 1))
    if unknown:
        raise ValueError(f"{where}: llama3 rope scaling field(s) {unknown} are not supported by this engine")
    return Llama3Scaling(**{name: fields[name] for name in LLAMA3_FIELDS})
