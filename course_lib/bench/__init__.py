"""Benchmarking: honest timing, roofline arithmetic, results files and the plots the chapters share.

``python -m course_lib.bench NAME`` measures suite NAME on this device and writes its results file.
"""

from course_lib.bench.results import headline, load_result, provenance, save_result
from course_lib.bench.roofline import Roofline, achieved_gbps, achieved_tflops, roofline_time
from course_lib.bench.runner import run_suite
from course_lib.bench.timing import Timing, time_call

__all__ = [
    "Roofline", "Timing", "achieved_gbps", "achieved_tflops", "headline", "load_result", "provenance",
    "roofline_time", "run_suite", "save_result", "time_call",
]
