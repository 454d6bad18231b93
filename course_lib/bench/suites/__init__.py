"""Benchmark suites: one module per ``python -m course_lib.bench NAME``.

Each suite module defines ``DESCRIPTION``, ``steps(quick) -> list[Step]`` and
``headline(measurements) -> dict`` (the figures an issue's targets name); a suite that writes one file per setting
also defines ``result_name() -> str``, the file's name (``tensor_parallel``: one per tensor-parallel degree).
"""

SUITES = {
    "basics": "course_lib.bench.suites.basics",
    "coalescing": "course_lib.bench.suites.coalescing",
    "copy_sizes": "course_lib.bench.suites.copy_sizes",
    "collectives": "course_lib.bench.suites.collectives",
    "engine": "course_lib.bench.suites.engine",
    "env": "course_lib.bench.suites.env",
    "gemm": "course_lib.bench.suites.gemm",
    "norm": "course_lib.bench.suites.norm",
    "prefill": "course_lib.bench.suites.prefill",
    "paged_attention": "course_lib.bench.suites.paged_attention",
    "profile": "course_lib.bench.suites.profile",
    "tensor_parallel": "course_lib.bench.suites.tensor_parallel",
    "timeline": "course_lib.bench.suites.timeline",
}
