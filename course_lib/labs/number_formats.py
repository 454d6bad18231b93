"""The tensor-core input formats as numbers: bits, range and precision of each, and a picture of their bits.

A binary floating-point format is a sign, ``e`` exponent bits and ``p`` mantissa bits. The exponent bits set
the range (largest, smallest normal and smallest subnormal value), the mantissa bits the precision (epsilon,
the gap between 1 and the next number, is ``2**-p``). ``ml_dtypes.finfo`` knows every format NumPy holds;
tf32 is not a storage format (float32 with 13 mantissa bits ignored), so its facts come from the IEEE-754 rules.
Chapter 02 prints these facts as a table and checks that the rules reproduce ``ml_dtypes``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np
from matplotlib.patches import Rectangle

from course_lib.kernels import precision

NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
               "float8_e4m3": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def ieee_like(exponent_bits: int, mantissa_bits: int) -> dict[str, float]:
    """A format's facts by the IEEE-754 rules: the top exponent is kept for inf and NaN, the bottom one for
    zero and subnormals, and the bias is ``2**(e-1) - 1``."""
    bias = 2 ** (exponent_bits - 1) - 1
    return {"exponent": exponent_bits, "mantissa": mantissa_bits, "max": (2 - 2.0**-mantissa_bits) * 2.0**bias,
            "normal": 2.0 ** (1 - bias), "subnormal": 2.0 ** (1 - bias - mantissa_bits), "eps": 2.0**-mantissa_bits}


def describe(fmt: str) -> dict[str, float]:
    """The facts of one of ``precision.FORMATS``: from ``ml_dtypes.finfo``, or the IEEE rules for tf32."""
    if fmt == "tf32":  # float32's exponent, fp16's mantissa
        return ieee_like(8, precision.MANTISSA_BITS["tf32"])
    info = ml_dtypes.finfo(NUMPY_TYPES[fmt])
    return {"exponent": info.nexp, "mantissa": info.nmant, "max": float(info.max),
            "normal": float(info.smallest_normal), "subnormal": float(info.smallest_subnormal), "eps": float(info.eps)}


def format_facts() -> dict[str, dict[str, float]]:
    """The facts of every format of ``precision.FORMATS``, checked against the emulation's mantissa widths."""
    facts = {fmt: describe(fmt) for fmt in precision.FORMATS}
    for fmt, f in facts.items():
        if f["mantissa"] != precision.MANTISSA_BITS[fmt]:
            raise AssertionError(f"{fmt}: ml_dtypes says {f['mantissa']} mantissa bits, precision.py "
                                 f"{precision.MANTISSA_BITS[fmt]}")
    return facts


def format_table(facts: dict[str, dict[str, float]]) -> str:
    """One row per format: its bits, range, epsilon and the decimal digits its mantissa carries."""
    lines = [f"{'format':<13}{'sign/exp/mant':>14}{'largest':>12}{'smallest normal':>17}{'smallest subnormal':>20}"
             f"{'epsilon':>11}{'digits':>8}"]
    for fmt, f in facts.items():
        bits = f"1/{f['exponent']}/{f['mantissa']}"
        digits = (f["mantissa"] + 1) * np.log10(2)
        lines.append(f"{fmt:<13}{bits:>14}{f['max']:>12.4g}{f['normal']:>17.3g}{f['subnormal']:>20.3g}"
                     f"{f['eps']:>11.3g}{digits:>8.1f}")
    return "\n".join(lines)


def draw_bit_layouts(ax: plt.Axes, facts: dict[str, dict[str, float]]) -> None:
    """One bar per format: its sign, exponent and mantissa bits, and the 13 bits tf32 leaves unused."""
    colours = {"sign": "tab:red", "exponent": "tab:blue", "mantissa": "tab:green", "unused": "0.85"}
    for y, (fmt, f) in enumerate(reversed(facts.items())):
        parts = [("sign", 1), ("exponent", f["exponent"]), ("mantissa", f["mantissa"])]
        if fmt == "tf32":
            parts.append(("unused", 32 - 1 - f["exponent"] - f["mantissa"]))
        start = 0
        for part, width in parts:
            ax.barh(y, width, left=start, color=colours[part], edgecolor="white", height=0.7)
            ax.text(start + width / 2, y, str(width), ha="center", va="center", fontsize=8,
                    color="black" if part == "unused" else "white")
            start += width
    ax.set_yticks(range(len(facts)), list(reversed(facts)))
    ax.set_xticks(range(0, 33, 4))
    ax.set_xlabel("bits (tf32 lives in a 32-bit register; the tensor core ignores its last 13 bits)")
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours),
              loc="lower right", fontsize=8)
