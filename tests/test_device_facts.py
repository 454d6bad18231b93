"""What results files and the environment report record about the machine: names, versions, a folder name."""

import pytest

from course_lib import backend
from course_lib.device_facts import card_slug, cuda_version, device_facts


def test_device_facts_always_name_the_device_and_libraries():
    facts = device_facts()
    assert facts["name"] and facts["libraries"]["numpy"]
    assert facts["mode"] == backend.DECISION.mode


def test_card_slug_is_a_folder_name():
    assert card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cuda_versions_read_the_way_people_write_them():
    assert cuda_version(13020) == "13.2" and cuda_version(12080) == "12.8"


@pytest.mark.gpu
def test_gpu_facts_are_complete():
    facts = device_facts()
    for key in ("compute_capability", "sm_count", "memory_bytes", "driver_cuda_version", "runtime_cuda_version"):
        assert facts[key], key
    assert facts["sm_count"] == backend.sm_count()
