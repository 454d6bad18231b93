"""The GPU/CPU decision: forced modes, driver failures, old cards, and what each mode provides."""

import os
import subprocess
import sys

import pytest

from course_lib import backend


def probe(error=None, cc=(9, 0)):
    devices = [] if error else [{"name": "Test GPU", "compute_capability": cc, "sm_count": 1, "memory_bytes": 1}]
    return backend.DriverProbe(library="libcuda.so.1", error=error, driver_cuda_version=13000, devices=devices)


def test_cpu_can_be_forced():
    decision = backend.decide("cpu", probe())
    assert (decision.mode, decision.forced) == ("cpu", True)


def test_driver_error_means_cpu_mode_with_the_reason():
    decision = backend.decide(None, probe(error="the driver failed to initialise"))
    assert decision.mode == "cpu"
    assert "failed to initialise" in decision.reason


def test_forcing_gpu_without_one_is_a_clear_error():
    with pytest.raises(RuntimeError, match="COURSE_DEVICE=gpu, but no usable GPU: no driver"):
        backend.decide("gpu", probe(error="no driver"))


def test_unknown_course_device_value_is_rejected():
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        backend.decide("tpu", probe())


def test_cards_older_than_sm75_run_in_cpu_mode():
    decision = backend.decide(None, probe(cc=(6, 1)))
    assert decision.mode == "cpu"
    assert "sm_61" in decision.reason and "sm_75" in decision.reason


def test_probe_never_raises_here():
    result = backend.probe_driver()
    assert result.ok or result.error


def test_mode_line_names_the_mode():
    assert backend.mode_line().startswith("Mode: GPU" if backend.has_gpu() else "Mode: CPU")


def test_a_long_mode_line_wraps_to_fit_a_notebook_output_box(monkeypatch):
    reason = "CuPy could not use the GPU: CUDARuntimeError: " + "a very long error message " * 8
    monkeypatch.setattr(backend, "DECISION", backend.decide(None, probe(error=reason)))
    lines = backend.mode_line().splitlines()
    assert lines[0] == "Mode: CPU (NumPy + Numba CUDA simulator) -"
    assert max(len(line) for line in lines) <= backend.OUTPUT_COLUMNS
    assert " ".join(backend.mode_line().split()) == f"Mode: CPU (NumPy + Numba CUDA simulator) - {reason.strip()}"
    monkeypatch.setattr(backend, "DECISION", backend.decide(None, probe(error="no driver")))
    assert backend.mode_line() == "Mode: CPU (NumPy + Numba CUDA simulator) - no driver"


def test_cpu_mode_uses_numpy_and_the_simulator():
    if backend.has_gpu():
        pytest.skip("this machine runs in GPU mode; the CPU-mode check runs in a subprocess below")
    import numpy

    assert backend.xp is numpy
    assert backend.simulator_active()
    assert os.environ["NUMBA_ENABLE_CUDASIM"] == "1"


def test_course_device_cpu_forces_cpu_mode_in_a_new_process():
    script = "from course_lib import backend as b; print(b.DECISION.mode, b.simulator_active(), b.xp.__name__)"
    env = {**os.environ, "COURSE_DEVICE": "cpu"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "True", "numpy"]


def test_to_numpy_accepts_host_arrays():
    import numpy

    assert backend.to_numpy([1, 2]).tolist() == [1, 2]
    assert isinstance(backend.to_numpy(backend.xp.arange(3)), numpy.ndarray)


@pytest.mark.gpu
def test_gpu_mode_runs_cupy_and_real_kernels_on_a_supported_card():
    assert backend.compute_capability() >= backend.OLDEST_SUPPORTED_CC and backend.sm_count() > 0
    assert backend.xp.__name__ == "cupy"
    assert not backend.simulator_active()
