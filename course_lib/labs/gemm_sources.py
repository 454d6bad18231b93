"""What the GEMM chapters read out of the course's ``.cu`` files: functions, sections and constants.

Chapters 02 and 03 print the kernels they teach from the very files the launchers compile, never from a
copy that could drift, and they compute tile sizes, stages and register budgets from the sources'
``constexpr int`` lines. The functions here find those pieces of text; they understand just enough C++ for
the course's own files (one function per paragraph, braces balanced, ``// ---- heading`` section lines).
"""

from __future__ import annotations

import re

from course_lib import compile as cuda_compile


def source_text(file: str) -> str:
    """The text of a course ``.cu`` or ``.cuh`` file, found where the launchers find it."""
    return cuda_compile.kernel_path(file).read_text()


def cuda_function(file: str, name: str) -> str:
    """The definition of function ``name`` in a course source, with the comment lines just above it.

    ``name`` may carry template arguments (``mma_m16n8k16<__nv_bfloat16>`` picks that specialisation). The
    definition starts at the first line that names the function and is not a comment or an explicit
    instantiation; the walk up collects the comment, ``template <...>`` and ``__global__`` lines above it, and
    the walk down ends where the braces balance again.
    """
    lines = source_text(file).splitlines()
    starts = [i for i, line in enumerate(lines) if re.search(rf"\b{re.escape(name)}\s*(<[^>]*>)?\s*\(", line)
              and not line.lstrip().startswith(("//", "template __global__"))]
    if not starts:
        raise ValueError(f"{file} defines no function {name!r}")
    first = starts[0]
    while (first > 0 and lines[first - 1].strip() and not lines[first - 1].startswith("#")
           and not lines[first - 1].rstrip().endswith((";", "}", "{"))):
        first -= 1
    depth, last, opened = 0, starts[0], False
    for last in range(starts[0], len(lines)):
        depth += lines[last].count("{") - lines[last].count("}")
        opened = opened or "{" in lines[last]
        if opened and depth == 0:
            break
    return "\n".join(lines[first:last + 1])


def cuda_constants(file: str) -> dict[str, int]:
    """The integers a source names as ``constexpr int NAME = literal`` (tile sizes, stages, thread counts).

    A constant defined by an expression (``THREADS = (BM / TM) * ...``) is left out: only literals are read,
    so every number a chapter derives from them is computed in Python where the reader can see it.
    """
    found = {}
    for declaration in re.findall(r"constexpr int ([^;]+);", source_text(file)):
        found.update((name, int(value)) for name, value in re.findall(r"(\w+) = (\d+)\b(?! *[-+*/])", declaration))
    return found


def excerpt(text: str, first: str, last: str) -> str:
    """The lines of ``text`` from the one containing ``first`` to the next one containing ``last``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if last in lines[i])
    return "\n".join(lines[start:end + 1])


def section(file: str, heading: str) -> str:
    """The part of a course source under the ``// ---- heading`` line, up to the next such line."""
    for part in re.split(r"(?m)^(?=// ---- )", source_text(file)):
        if part.startswith(f"// ---- {heading}"):
            return part.rstrip()
    raise ValueError(f"{file} has no section '// ---- {heading}'")


def wgmma_shape() -> tuple[int, int, int]:
    """(m, n, k) of the ``wgmma.mma_async`` instruction step 7 issues, read from its inline PTX."""
    found = re.search(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", source_text("gemm_wgmma.cu"))
    if found is None:
        raise ValueError("gemm_wgmma.cu issues no wgmma.mma_async instruction")
    m, n, k = (int(x) for x in found.groups())
    return m, n, k
