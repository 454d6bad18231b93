"""Exercise checkers: run the learner's code on fresh random inputs and say clearly what is wrong.

The framework (DESIGN.md, "Checkers"): poisoned outputs, the first wrong element with its index and
both values, a time limit on learner code, hints for known mistakes, and a seed in every message.
Each check cell passes its exercise's number (``exercise="04.1"``, ``exercise.py``) so that a failure names it,
and ``python -m course_lib.check NOTEBOOK --task N`` checks one exercise of a notebook outside Jupyter
(``__main__.py``; the notebook's layout in ``notebook.py``, the run in ``attempt.py``).
"""

from course_lib.check.ch00 import check_achieved_gbps, check_roofline_time, check_vector_add
from course_lib.check.ch01 import check_block_sum, check_rms_norm, check_saxpy
from course_lib.check.ch02 import check_wmma_gemm
from course_lib.check.ch03 import check_tiled_gemm
from course_lib.check.ch04 import check_block_hashes, check_paged_decode, check_slot_mapping
from course_lib.check.compare import assert_close
from course_lib.check.failure import CheckFailed, NotWrittenYet
from course_lib.check.learner import call_learner, default_time_limit_s, is_cuda_kernel, launch_learner_kernel
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison, poison_value
from course_lib.check.run import CheckRun, new_seed
from course_lib.check.tolerance import relative_error, tolerance_for

__all__ = [
    "CheckFailed",
    "CheckRun",
    "Mistake",
    "NotWrittenYet",
    "assert_close",
    "call_learner",
    "check_achieved_gbps",
    "check_block_hashes",
    "check_block_sum",
    "check_paged_decode",
    "check_rms_norm",
    "check_roofline_time",
    "check_saxpy",
    "check_slot_mapping",
    "check_tiled_gemm",
    "check_vector_add",
    "check_wmma_gemm",
    "default_time_limit_s",
    "is_cuda_kernel",
    "is_poison",
    "launch_learner_kernel",
    "new_seed",
    "poison",
    "poison_value",
    "relative_error",
    "tolerance_for",
]
