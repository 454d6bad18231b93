"""``python -m course_lib.env``: always exits 0, names what is broken, never prints secrets."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from course_lib import backend, env


def run_env(*args, **extra_env):
    environment = {**os.environ, **extra_env}
    environment.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run([sys.executable, "-m", "course_lib.env", *args], env=environment,
                          capture_output=True, text=True, timeout=120)


def flowing(text: str) -> str:
    """The report as one line: it wraps at ``backend.OUTPUT_COLUMNS``, so a phrase may span two of its lines."""
    return " ".join(text.split())


def test_report_names_mode_compile_check_and_advice():
    out = run_env()
    assert out.returncode == 0
    assert out.stdout.startswith("Mode: ")
    assert "sm_90a: ok" in out.stdout
    assert "Advice:" in out.stdout and "00 Environment check" in out.stdout


def test_json_report_parses():
    report = json.loads(run_env("--json").stdout)
    assert report["mode"] == backend.DECISION.mode
    assert {"system", "driver", "libraries", "mpi", "advice", "chapters"} <= report.keys()


def test_secrets_are_never_printed():
    out = run_env("--json", HF_TOKEN="hf_secret_value_123", CUDA_API_KEY="key_value_456", NCCL_DEBUG="INFO",
                  NCCL_PSK="psk_value_789_that_is_long_enough_for_nccl")
    assert "hf_secret_value_123" not in out.stdout and "key_value_456" not in out.stdout
    assert "psk_value_789" not in out.stdout
    assert '"HF_TOKEN": "<hidden>"' in out.stdout and '"NCCL_DEBUG": "INFO"' in out.stdout


def test_report_explains_the_nccl_variables_set_and_the_courses_nvls_setting():
    out = run_env(NCCL_DEBUG="INFO", NCCL_NVLS_ENABLE="0", NCCL_PROTO="LL129", NCCL_DEBUG_SUBSYTEM="INIT",
                  NCCL_PSK="psk_value_789_that_is_long_enough_for_nccl")
    text = flowing(out.stdout)
    assert out.returncode == 0
    assert "NVLink SHARP off: NCCL_NVLS_ENABLE=0, as the course keeps it" in text
    assert "NCCL_DEBUG=INFO: how much NCCL prints" in text
    assert "[warning] NCCL_PROTO=LL129: NCCL does not document 'LL129'" in text
    assert "[info] NCCL_DEBUG_SUBSYTEM=INIT: not in the course's catalogue; check the spelling (did you mean " \
           "NCCL_DEBUG_SUBSYS?)" in text
    assert "psk_value_789" not in out.stdout and "NCCL_PSK=<hidden>" in out.stdout


def test_json_report_says_when_nvls_is_not_off():
    report = json.loads(run_env("--json", NCCL_NVLS_ENABLE="2").stdout)
    assert report["nccl_environment"]["nvls_off"] is False
    (setting,) = [s for s in report["nccl_environment"]["settings"] if s["name"] == "NCCL_NVLS_ENABLE"]
    assert setting["value"] == "2" and setting["value_known"] is True


def test_a_bad_course_device_value_is_advice_not_a_crash():
    out = run_env(COURSE_DEVICE="tpu")
    assert out.returncode == 0 and "[problem] COURSE_DEVICE must be 'cpu' or 'gpu'" in flowing(out.stdout)


def test_forcing_a_missing_gpu_is_advice_not_a_crash():
    if backend.has_gpu():
        pytest.skip("this machine has a GPU")
    out = run_env(COURSE_DEVICE="gpu")
    assert out.returncode == 0 and "[problem] COURSE_DEVICE=gpu, but no usable GPU" in flowing(out.stdout)


FAKE_DRIVER = r"""
// A stand-in libcuda.so.1 whose cuInit fails the way a broken install does.
int cuInit(unsigned flags) { return CUINIT_RESULT; }
int cuDriverGetVersion(int* version) { *version = DRIVER_VERSION; return 0; }
"""


@pytest.fixture
def broken_driver(tmp_path):
    """Build a fake driver library and put it first on the loader's path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("building a stand-in libcuda needs a C compiler on Linux")

    def build(cuinit_result: int, driver_version: int) -> dict:
        source = tmp_path / "fake_cuda.c"
        source.write_text(FAKE_DRIVER.replace("CUINIT_RESULT", str(cuinit_result))
                          .replace("DRIVER_VERSION", str(driver_version)))
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(source)], check=True)
        return {"LD_LIBRARY_PATH": str(tmp_path)}

    return build


def test_a_driver_that_fails_to_initialise_is_explained(broken_driver):
    out = run_env(**broken_driver(999, 13000))
    text = flowing(out.stdout)
    assert out.returncode == 0
    assert "An NVIDIA driver is installed" in text and "CUDA_ERROR_UNKNOWN" in text
    assert "nvidia-smi" in text


def test_a_driver_too_old_for_cupy_suggests_the_cuda12_wheel(broken_driver):
    out = run_env(**broken_driver(35, 12020))
    text = flowing(out.stdout)
    assert out.returncode == 0
    assert "CUDA 12.2" in text and "pip install cupy-cuda12x" in text


def test_numpy_too_new_for_numba_cuda_is_flagged():
    report = env.collect()
    report.libraries = {**report.libraries, "numpy": "2.5.0"}
    texts = [a.text for a in env.advise(report, backend.DECISION)]
    assert any("breaks numba-cuda" in text for text in texts)


def test_missing_mpi_is_flagged():
    report = env.collect()
    report.mpi = {"error": "ModuleNotFoundError: No module named 'mpi4py'", "mpiexec": None}
    advice = env.advise(report, backend.DECISION)
    assert any(a.level == "warning" and "pip install mpi4py" in a.text for a in advice)


def test_chapter_table_comes_from_the_notebooks():
    titles = [c["chapter"] for c in env.chapter_modes(gpu=False)]
    assert "00 Environment check" in titles


def test_every_line_of_the_report_fits_a_notebook_output_box():
    report = env.collect()
    long_title = "Lab 99 A chapter whose title is longer than any column of a table would be"
    report.chapters.append({"chapter": long_title, "mode": "CPU", "here": "what runs here, " * 12})
    report.environment["LD_LIBRARY_PATH"] = ":".join(f"/opt/library/number_{i}/lib64" for i in range(8))
    report.advice.append(env.Advice("warning", "a long piece of advice " * 10))
    lines = env.render(report).splitlines()
    assert max(len(line) for line in lines) <= backend.OUTPUT_COLUMNS
    assert f"  {long_title}" in lines  # a title has a line of its own: it cannot run into the next column
    numpy = f"numpy {report.libraries['numpy']}"
    assert any(numpy in line for line in lines)  # a list breaks between its items, never inside one


@pytest.mark.gpu
def test_measured_figures_on_the_gpu():
    out = run_env("--measure")
    assert re.search(r"^Measured +copy_gbps", out.stdout, re.MULTILINE)
    assert re.search(r"^NCCL +2\.", out.stdout, re.MULTILINE)
