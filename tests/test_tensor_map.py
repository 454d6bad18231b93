"""Tensor maps are checked before the driver encodes them: TMA's rules, said in the course's words."""

from types import SimpleNamespace

import pytest

from course_lib.kernels import tensor_map


def matrix(rows, cols, pointer=4096):
    return SimpleNamespace(shape=(rows, cols), data=SimpleNamespace(ptr=pointer))


@pytest.mark.parametrize("fake, dtype, box_cols, message", [
    (matrix(64, 64), "float32", 64, "float16 or bfloat16"),
    (matrix(64, 12), "bfloat16", 64, "multiple of 8"),
    (matrix(64, 64, pointer=4098), "bfloat16", 64, "16-byte aligned rows"),
    (matrix(64, 128), "bfloat16", 128, "at most 64 elements"),
])
def test_maps_that_tma_cannot_use_are_refused_with_the_rule(fake, dtype, box_cols, message):
    with pytest.raises((TypeError, ValueError), match=message):
        tensor_map.tiled_map(fake, dtype, 64, box_cols)
