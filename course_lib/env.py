"""What this machine has for the course, and what to do about what it lacks (chapter 00).

``python -m course_lib.env`` prints the report; chapter 00 shows the same. Every probe is wrapped
so that a broken CUDA install becomes advice, not a crash: the command always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

BOOK_DIR = Path(__file__).resolve().parent.parent / "book"
# Environment variables worth showing; any whose name looks secret is masked all the same.
SHOWN_PREFIXES = ("COURSE_", "CUDA_", "NCCL_", "NUMBA_", "CUPY_", "OMPI_", "MPICH_", "HYDRA_", "LD_LIBRARY_PATH", "HF_")
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASS|PSK|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
NEWEST_NUMPY_FOR_NUMBA_CUDA = (2, 4)
LABEL_COLUMNS = len("Environment ")  # the report's first column: its longest label and a space


@dataclass
class Advice:
    level: str  # "ok", "info", "warning" or "problem"
    text: str


@dataclass
class Report:
    """Everything chapter 00 shows, as plain data (``--json`` prints it)."""

    mode: str
    mode_reason: str
    system: dict[str, Any]
    driver: dict[str, Any]
    gpu: dict[str, Any] | None
    libraries: dict[str, str]
    imports: dict[str, str]  # module -> "ok" or the error it raised
    compile_check: dict[str, str]
    mpi: dict[str, Any]
    nccl: str
    nccl_environment: nccl_env.Explanation  # the NCCL_* variables set, explained; NVLS off or not
    environment: dict[str, str]
    chapters: list[dict[str, str]]
    advice: list[Advice] = field(default_factory=list)


def _import_backend() -> tuple[ModuleType, Advice | None]:
    """Import ``course_lib.backend``; if ``COURSE_DEVICE`` makes that fail, drop it and say why."""
    try:
        from course_lib import backend
    except (RuntimeError, ValueError) as exc:
        os.environ.pop("COURSE_DEVICE", None)
        from course_lib import backend

        problem = str(exc).replace(" Run `python -m course_lib.env`.", "")
        return backend, Advice("problem", f"{problem} This report ignores COURSE_DEVICE; unset it or fix the GPU.")
    return backend, None


backend, COURSE_DEVICE_PROBLEM = _import_backend()
from course_lib.device_facts import (  # noqa: E402 - it imports backend: only once the guarded import above is done
    cpu_name,
    cuda_version,
    device_facts,
    library_versions,
    nccl_version,
)
from course_lib.distributed import nccl_env  # noqa: E402 - its package may import backend: after the guard too


def _safely(probe: Callable[[], Any], fallback: Callable[[str], Any]) -> Any:
    """Run a probe; on any exception return ``fallback(error text)`` instead of crashing."""
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - the report must survive any broken install
        return fallback(f"{type(exc).__name__}: {exc}")


def system_facts() -> dict[str, Any]:
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(memory / 1e9, 1) if memory else None,
    }


def import_health() -> dict[str, str]:
    """Import each module the chapters use and record what went wrong, if anything."""
    modules = ["numpy", "numba", "numba.cuda", "cupy", "cuda.bindings.nvrtc", "mpi4py", "matplotlib"]
    health = {}
    for name in modules:
        health[name] = _safely(lambda name=name: __import__(name) and "ok", lambda error: error)
    return health


def compile_check() -> dict[str, str]:
    """Compile the first kernel of the course for every target with NVRTC (no GPU needed)."""
    from course_lib import compile as cuda_compile

    results = {}
    for arch in cuda_compile.TARGETS:
        def attempt(arch: str = arch) -> str:
            kernels = cuda_compile.compile_file("vector_add.cu", arch).kernels
            return f"ok ({kernels[0].registers} registers)" if kernels else "ok (no ptxas for a resource report)"

        results[arch] = _safely(attempt, lambda error: error.splitlines()[0])
    return results


def mpi_facts() -> dict[str, Any]:
    """mpi4py's version, the MPI library under it and where ``mpiexec`` is, without starting MPI."""
    facts: dict[str, Any] = {"mpiexec": _find_mpiexec()}
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # only asking for versions: no MPI_Init
        from mpi4py import MPI

        facts["mpi4py"] = mpi4py.__version__
        facts["library"] = MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
        facts["standard"] = "MPI {}.{}".format(*MPI.Get_version())
    except Exception as exc:  # noqa: BLE001 - missing or broken MPI is advice, not a crash
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def _find_mpiexec() -> str | None:
    beside_python = Path(sys.executable).parent / ("mpiexec.exe" if os.name == "nt" else "mpiexec")
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


def visible_environment() -> dict[str, str]:
    """The course-relevant environment variables, with anything that looks secret masked."""
    shown = {}
    for name, value in sorted(os.environ.items()):
        if not name.startswith(SHOWN_PREFIXES):
            continue
        shown[name] = "<hidden>" if SECRET_NAME.search(name) else value
    return shown


def chapter_modes(gpu: bool) -> list[dict[str, str]]:
    """For each chapter in ``book/``, what runs here (its notebook metadata says what needs a GPU)."""
    chapters = []
    for notebook in sorted(BOOK_DIR.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in notebook.parts:
            continue
        meta = json.loads(notebook.read_text()).get("metadata", {}).get("course", {})
        chapters.append({
            "chapter": meta.get("title", notebook.stem),
            "mode": "GPU" if gpu else "CPU",
            "here": meta.get("gpu", "everything") if gpu else meta.get("cpu", "everything"),
        })
    return chapters


def collect(measure: bool = False) -> Report:
    """Probe everything; never raises."""
    decision = backend.DECISION
    probe = backend.probe_driver() if decision.forced and decision.mode == "cpu" else decision.probe
    gpu = _safely(device_facts, lambda error: {"error": error}) if backend.has_gpu() else None
    if measure and gpu is not None:  # first, before the other probes load more libraries into the process
        from course_lib.bench import run_suite

        gpu["measured"] = _safely(lambda: run_suite("env", quick=True)["headline"], lambda e: {"error": e})
    report = Report(
        mode=decision.mode,
        mode_reason=decision.reason,
        system=system_facts(),
        driver=asdict(probe),
        gpu=gpu,
        libraries=library_versions(),
        imports=import_health(),
        compile_check=_safely(compile_check, lambda error: {"all": error}),
        mpi=mpi_facts(),
        nccl=nccl_version() or "not available (NCCL needs NVIDIA GPUs; chapter 05 runs over MPI on CPU)",
        nccl_environment=nccl_env.explain(),
        environment=visible_environment(),
        chapters=chapter_modes(backend.has_gpu()),
    )
    report.advice = ([COURSE_DEVICE_PROBLEM] if COURSE_DEVICE_PROBLEM else []) + advise(report, decision)
    return report


def advise(report: Report, decision: backend.Decision) -> list[Advice]:
    """Turn the findings into what a learner should do next, most serious first."""
    advice: list[Advice] = []
    driver, libs = report.driver, report.libraries
    if decision.mode == "gpu":
        card = decision.reason.removeprefix("found ")
        advice.append(Advice("ok", f"GPU mode on {card}: every chapter runs for real."))
    elif decision.forced:
        advice.append(Advice("info", "COURSE_DEVICE=cpu forces CPU mode; unset it to use the GPU."))
    elif not driver.get("library"):
        advice.append(Advice("info", "No NVIDIA driver here: every chapter runs in CPU mode (NumPy, the Numba "
                                     "CUDA simulator, NVRTC compile checks, MPI). For a GPU, install an NVIDIA "
                                     "driver for CUDA 13 (version 580 or newer) on an sm_75+ card."))
    else:
        advice.extend(_gpu_problem_advice(decision, driver, libs))
    numpy_version = tuple(int(p) for p in libs.get("numpy", "0.0").split(".")[:2])
    if numpy_version > NEWEST_NUMPY_FOR_NUMBA_CUDA:
        advice.append(Advice("problem", f"numpy {libs['numpy']} breaks numba-cuda 0.30's import; "
                                        "pip install numpy==2.4.6"))
    for module, status in report.imports.items():
        if status != "ok" and module not in ("cupy",):
            advice.append(Advice("problem", f"`import {module}` failed: {status}. Run "
                                            "`pip install -r requirements.txt` in the course's environment."))
    failed = [arch for arch, status in report.compile_check.items() if not status.startswith("ok")]
    if failed:
        advice.append(Advice("problem", f"NVRTC could not compile for {', '.join(failed)}: "
                                        f"{report.compile_check[failed[0]]}. The compile checks need the "
                                        "nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels of requirements.txt."))
    mpi = report.mpi
    if "error" in mpi or not mpi.get("mpiexec"):
        why = mpi.get("error", "no mpiexec on PATH or beside Python")
        advice.append(Advice("warning", f"MPI is missing ({why}): chapter 05's CPU path and the MPI tests need "
                                        "it. pip install mpi4py==4.1.2 mpich==5.0.2 (Linux/macOS) or "
                                        "impi-rt (Windows)."))
    for setting in report.nccl_environment.settings:
        if setting.suspect:  # a name NCCL may not read is "info"; a value it does not document, a "warning"
            advice.append(Advice("info" if setting.variable is None else "warning",
                                 f"{setting.name}={setting.value}: {setting.note}"))
    if not any(a.level in ("problem", "warning") for a in advice):
        advice.append(Advice("ok", "Nothing is missing for the course in this mode."))
    return advice


def _gpu_problem_advice(decision: backend.Decision, driver: dict[str, Any], libs: dict[str, str]) -> list[Advice]:
    """A driver is here but the GPU is not usable: say why and what to do."""
    version = driver.get("driver_cuda_version")
    driver_cuda = cuda_version(version) if version else "unknown"
    cupy_wheel = next((name for name in libs if name.startswith("cupy-cuda")), None)
    advice = [Advice("problem", f"An NVIDIA driver is installed ({driver['library']}, CUDA {driver_cuda}) "
                                f"but the GPU is not usable: {decision.reason}. Running in CPU mode.")]
    if version and version < 13000 and cupy_wheel == "cupy-cuda13x":
        advice.append(Advice("problem", f"The driver supports CUDA {driver_cuda}, CuPy here is built for CUDA "
                                        "13. Update the driver to 580 or newer, or switch CuPy to CUDA 12: "
                                        "pip uninstall -y cupy-cuda13x && pip install cupy-cuda12x==14.2.0"))
    elif "sm_" in decision.reason and "needs sm_75" in decision.reason:
        advice.append(Advice("info", "CUDA 13 supports sm_75 (Turing) and newer; this course runs on older "
                                     "cards only in CPU mode."))
    elif driver.get("error"):
        advice.append(Advice("problem", "Check `nvidia-smi`: if it fails too, reinstall the driver (or reboot "
                                        "after a driver update so the kernel module matches the library)."))
    elif decision.cupy_error:
        advice.append(Advice("problem", "The driver works but CuPy does not: reinstall the CuPy wheel that "
                                        "matches the driver's CUDA major version (cupy-cuda13x or cupy-cuda12x)."))
    return advice


def render(report: Report) -> str:
    """The report as text, the way the command prints it, in lines of at most ``backend.OUTPUT_COLUMNS``.

    Chapter 00 prints it into an output box that cuts off longer lines, so every entry wraps under its own
    column: a label, then the text; a chapter's title, then what runs of it, indented below.
    """
    lines = [*_wrapped(f"Mode: {report.mode.upper()} ({report.mode_reason})", "", "  "), ""]
    system = report.system
    lines += _field("System", f"{system['os']} {system['machine']}, {system['cpu']}, {system['cpu_count']} cores, "
                              f"{system['memory_gb']} GB RAM; Python {system['python']}")
    driver = report.driver
    if report.gpu and "name" in report.gpu:
        g = report.gpu
        driver_cuda = cuda_version(g["driver_cuda_version"])
        runtime_cuda = cuda_version(g["runtime_cuda_version"])
        lines += _field("GPU", f"{g['name']} (sm_{g['compute_capability'].replace('.', '')}), {g['sm_count']} SMs, "
                               f"{g['memory_bytes'] / 2**30:.1f} GiB, driver CUDA {driver_cuda}, "
                               f"runtime CUDA {runtime_cuda}")
        if "measured" in g:
            lines += _field("Measured", _figures(g["measured"]))
    else:
        lines += _field("GPU", f"none usable: {driver.get('error') or report.mode_reason}")
    lines += _field("NCCL", report.nccl)
    indent = " " * LABEL_COLUMNS
    for line in nccl_env.render(report.nccl_environment).splitlines():
        lines += _wrapped(line, indent, indent)
    mpi = report.mpi
    lines += _field("MPI", f"{mpi.get('library', mpi.get('error'))}; mpiexec: {mpi.get('mpiexec')}")
    lines += _field("Compile", [f"{arch}: {status}" for arch, status in report.compile_check.items()])
    lines += _field("Libraries", [f"{k} {v}" for k, v in report.libraries.items()])
    if report.environment:
        lines += _field("Environment", [f"{k}={v}" for k, v in report.environment.items()])
    if report.chapters:
        lines += ["", f"Chapters in {report.mode.upper()} mode:"]
        for chapter in report.chapters:
            lines += [f"  {chapter['chapter']}", *_wrapped(chapter["here"], "      ", "      ")]
    lines += ["", "Advice:"]
    for advice in report.advice:
        first = f"  [{advice.level}] "
        lines += _wrapped(advice.text, first, " " * len(first))
    return "\n".join(lines)


def _field(label: str, text: str | list[str]) -> list[str]:
    """One entry of the report: ``label`` in the first column, ``text`` wrapped in the second.

    A list breaks between its items only, so that ``numpy 2.4.6`` or ``sm_90: ok (12 registers)`` stays whole.
    """
    if isinstance(text, list):
        # textwrap breaks lines at whitespace only: the spaces inside each item become NULs until it is done.
        keep = "\0"
        wrapped = _wrapped(", ".join(item.replace(" ", keep) for item in text), label.ljust(LABEL_COLUMNS),
                           " " * LABEL_COLUMNS)
        return [line.replace(keep, " ") for line in wrapped]
    return _wrapped(text, label.ljust(LABEL_COLUMNS), " " * LABEL_COLUMNS)


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    """``text`` in lines of at most ``backend.OUTPUT_COLUMNS``, the first after ``first``, the others after ``rest``."""
    return textwrap.wrap(" ".join(text.split()), backend.OUTPUT_COLUMNS, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False)


def _figures(measured: dict[str, Any]) -> list[str]:
    return [f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.env",
        description="Report what this machine has for the course (GPU or not, versions, MPI, NCCL, "
        "compile checks), which mode the chapters will run in, and what to fix. Always exits 0.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--measure", action="store_true",
                        help="on a GPU, also measure copy bandwidth and matmul rate (a few seconds)")
    args = parser.parse_args(argv)
    try:
        report = collect(measure=args.measure)
        print(json.dumps(asdict(report), indent=2, default=str) if args.json else render(report))
    except Exception:  # noqa: BLE001 - last resort: the environment check itself must not fail
        print("The environment check hit an unexpected error; please report it with this output:")
        print(traceback.format_exc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
