#!/usr/bin/env python3
"""Set up the course's environment, build the book, run the tests: the README's two commands.

    python3 scripts/course.py book    # set up .venv, build the book, print where the HTML is
    python3 scripts/course.py test    # set up .venv, run every check CI runs

For a machine with no network (a cluster node), fill a wheelhouse where there is network, copy it
over together with the checkout, and set up from it:

    python3 scripts/course.py wheelhouse DIR [--python 3.12 --platform manylinux_2_28_x86_64]
    python3 scripts/course.py setup --offline DIR

Only the standard library is used here, so this runs on Linux, macOS and Windows before anything is
installed. setup, book and test need Python 3.11+ (the pinned NumPy 2.4 does); wheelhouse also runs
with Python 3.10, for a target named with --python 3.11 or newer. The environment lives in ``.venv``
at the repository root and is reinstalled only when requirements.txt or pyproject.toml change.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
VENV = ROOT / ".venv"
PIP = "pip==26.0.1"
MANIFEST = "wheelhouse.json"
MIN_PYTHON = (3, 11)  # the pinned NumPy 2.4 needs it
BUILD = ROOT / "_build"
# What the chapters import, run and read besides their own text. Sphinx re-executes a page only when the
# page itself changed, so after a change to one of these it would keep serving pages run on the old code.
BOOK_INPUTS = ("course_lib", "examples", "requirements.txt", "pyproject.toml")
NOT_BOOK_INPUTS = ("__pycache__", "cpu-*")  # what running them writes: bytecode, this machine's CPU-mode results
# What jupyter-book writes into BUILD: the pages, Sphinx's saved state, the executed notebooks. The rest of
# BUILD (the test command's executed copies and screenshots) is left alone.
BOOK_OUTPUTS = ("html", ".doctrees", "jupyter_execute")
BOOK_STAMP = BUILD / "course-inputs.sha256"  # the hash of BOOK_INPUTS the last successful build ran on


def venv_python(venv_dir: Path) -> Path:
    """The Python of the virtual environment in ``venv_dir``."""
    return venv_dir / "Scripts" / "python.exe" if os.name == "nt" else venv_dir / "bin" / "python"


PYTHON = venv_python(VENV)
BIN = PYTHON.parent  # the environment's programs: jupyter-book, mpiexec


class CourseError(Exception):
    """A request this script refuses; the message says why and what to do instead."""


def run(*command: str | Path, **kwargs) -> None:
    """Run a command from the repository root, echoing it; stop everything if it fails."""
    print(f"\n$ {' '.join(str(c) for c in command)}", flush=True)
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True, **kwargs)


def install_fingerprint(requirements: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(requirements.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()


def setup(offline: Path | None = None, venv_dir: Path = VENV, requirements: Path = REQUIREMENTS) -> None:
    """Create the virtual environment and install the pinned requirements and ``course_lib`` (editable) into it.

    With ``offline``, a wheelhouse made by ``build_wheelhouse``, pip reads nothing but that folder
    (``--no-index``). ``course_lib`` is installed editable from this checkout either way (its build
    backend, setuptools, is in the wheelhouse), so both leave the same environment and share its stamp.
    """
    python = venv_python(venv_dir)
    if offline is not None:
        offline = offline.resolve()
        refuse_foreign_wheelhouse(offline, python if python.exists() else Path(sys.executable), requirements)
    stamp = venv_dir / ".course-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == install_fingerprint(requirements):
        print(f"Environment {venv_dir} is up to date.")
        return
    prepare_pip(venv_dir, offline)
    run(*pip_install(python, offline), "-r", requirements)
    run(*pip_install(python, offline), "--no-deps", "-e", ".")
    stamp.write_text(install_fingerprint(requirements))


def pip_install(python: Path, wheelhouse: Path | None = None) -> list[str | Path]:
    """``pip install``, quietly; with ``wheelhouse``, from that folder only (``--no-index``)."""
    source = [] if wheelhouse is None else ["--no-index", "--find-links", wheelhouse]
    return [python, "-m", "pip", "install", "--quiet", *source]


def prepare_pip(venv_dir: Path = VENV, wheelhouse: Path | None = None) -> Path:
    """The course's pip, in its virtual environment (created if needed, nothing else installed)."""
    python = venv_python(venv_dir)
    if not python.exists():
        print(f"Creating the course's virtual environment in {venv_dir}", flush=True)
        venv.create(venv_dir, with_pip=True)
    run(*pip_install(python, wheelhouse), "--upgrade", PIP)
    return python


# --- a wheelhouse: every wheel the course needs, for a machine with no network ----------------

# What a Python interpreter says about itself: what a wheelhouse is checked against.
DESCRIBE = """import json, platform, sys
libc, libc_version = platform.libc_ver()
print(json.dumps({"python_version": "%d.%d" % sys.version_info[:2], "implementation": sys.implementation.name,
                  "sys_platform": sys.platform, "platform_machine": platform.machine(),
                  "glibc": libc_version if libc == "glibc" else "", "macos": platform.mac_ver()[0]}))"""

# pip evaluates environment markers (``; sys_platform == "linux"``), in requirements.txt and in every
# dependency's metadata, against the Python that runs it, even under --platform and --python-version.
# For another target it runs with the target's values in their place (pip 26.0.1, pinned above).
PIP_FOR_TARGET = (
    "import json, sys; from pip._vendor.packaging import markers; "
    "target = markers.default_environment() | json.loads(sys.argv.pop(1)); "
    "markers.default_environment = lambda: dict(target); "
    "from pip._internal.cli.main import main; sys.exit(main())"
)

SYSTEMS = {"linux": ("Linux", "posix"), "darwin": ("Darwin", "posix"), "win32": ("Windows", "nt")}
WINDOWS_MACHINES = {"win_amd64": "AMD64", "win_arm64": "ARM64", "win32": "x86"}
OLD_MANYLINUX_GLIBC = {"1": "2.5", "2010": "2.12", "2014": "2.17"}


def describe(python: Path) -> dict[str, str]:
    """The Python version, implementation, operating system, machine, glibc and macOS versions of ``python``."""
    answer = subprocess.run([str(python), "-c", DESCRIBE], capture_output=True, text=True, check=True)
    return json.loads(answer.stdout)


def platform_facts(tag: str) -> dict[str, str]:
    """What a wheel platform tag says about the target: its system and machine, and the oldest glibc or macOS."""
    if match := re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag):
        return {"sys_platform": "linux", "platform_machine": match[3], "glibc": f"{match[1]}.{match[2]}"}
    if match := re.fullmatch(r"manylinux(1|2010|2014)_(\w+)", tag):
        return {"sys_platform": "linux", "platform_machine": match[2], "glibc": OLD_MANYLINUX_GLIBC[match[1]]}
    if match := re.fullmatch(r"(?:musllinux_\d+_\d+|linux)_(\w+)", tag):
        return {"sys_platform": "linux", "platform_machine": match[1]}
    if match := re.fullmatch(r"macosx_(\d+)_(\d+)_(arm64|x86_64)", tag):
        return {"sys_platform": "darwin", "platform_machine": match[3], "macos": f"{match[1]}.{match[2]}"}
    if tag in WINDOWS_MACHINES:
        return {"sys_platform": "win32", "platform_machine": WINDOWS_MACHINES[tag]}
    raise CourseError(f"--platform {tag}: not a platform tag this script knows; name one such as "
                      "manylinux_2_28_x86_64, manylinux2014_aarch64, macosx_11_0_arm64 or win_amd64")


def pip_platforms(tags: Sequence[str]) -> list[str]:
    """The tags to hand pip: it widens macosx_14_0 to older macOS, but manylinux_2_28 only to itself.

    A manylinux_2_28 machine runs every wheel made for an older glibc, down to manylinux_2_5, and the
    legacy names of those (manylinux2014 = 2.17, manylinux2010 = 2.12, manylinux1 = 2.5).
    """
    widened = []
    for tag in tags:
        if match := re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag):
            glibc, arch = int(match[1]), match[2]
            widened += [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
            widened += [f"manylinux{name}_{arch}" for name, floor in OLD_MANYLINUX_GLIBC.items()
                        if glibc >= version_tuple(floor)[1]]
        elif match := re.fullmatch(r"musllinux_1_(\d+)_(\w+)", tag):
            widened += [f"musllinux_1_{minor}_{match[2]}" for minor in range(int(match[1]), -1, -1)]
        else:
            widened.append(tag)
    return list(dict.fromkeys(widened))


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def platform_tag(machine: dict[str, str]) -> str | None:
    """The most specific wheel platform tag of a machine that ``describe`` described, where it has one."""
    arch = machine["platform_machine"]
    if machine["sys_platform"] == "linux" and machine["glibc"]:
        return f"manylinux_{machine['glibc'].replace('.', '_')}_{arch}"
    if machine["sys_platform"] == "darwin" and machine["macos"]:
        major, minor = version_tuple(machine["macos"])[:2]
        return f"macosx_{major}_{minor if major == 10 else 0}_{arch}"  # since macOS 11 wheels name only the major
    if machine["sys_platform"] == "win32":
        return {value: key for key, value in WINDOWS_MACHINES.items()}.get(arch)
    return None


def named_target(python_version: str | None, platforms: Sequence[str]) -> dict[str, str]:
    """What ``--python`` and ``--platform`` say about a wheelhouse's target; the rest is this machine's."""
    target = {}
    if python_version is not None:
        if not re.fullmatch(r"3\.\d+(\.\d+)?", python_version):
            raise CourseError(f"--python {python_version}: give the target's Python version as 3.Y or 3.Y.Z, e.g. 3.12")
        target["python_version"] = ".".join(python_version.split(".")[:2])
    facts = [platform_facts(tag) for tag in platforms]
    if len({(fact["sys_platform"], fact["platform_machine"]) for fact in facts}) > 1:
        raise CourseError(f"--platform {' '.join(platforms)}: a wheelhouse is for one system and machine; "
                          "make one wheelhouse for each")
    for fact in facts:
        target.update(sys_platform=fact["sys_platform"], platform_machine=fact["platform_machine"])
        for floor in ("glibc", "macos"):  # pip may take a wheel made for any of the tags: the newest floor counts
            if floor in fact and version_tuple(fact[floor]) > version_tuple(target.get(floor, "0")):
                target[floor] = fact[floor]
    return target


def target_markers(python_version: str | None, target: dict[str, str]) -> dict[str, str]:
    """The environment-marker values pip must use for the target in place of its own Python's."""
    system, os_name = SYSTEMS.get(target["sys_platform"], ("", ""))
    markers = {"sys_platform": target["sys_platform"], "platform_system": system, "os_name": os_name,
               "platform_machine": target["platform_machine"], "implementation_name": "cpython",
               "platform_python_implementation": "CPython"}
    if python_version is not None:
        full_version = python_version if python_version.count(".") == 2 else f"{python_version}.0"
        markers.update(python_version=target["python_version"], python_full_version=full_version,
                       implementation_version=full_version)
    return markers


def requirements_sha256(requirements: Path) -> str:
    """A hash of the requirement lines, comments and blank lines left out."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in requirements.read_text().splitlines())
    return hashlib.sha256("\n".join(line for line in lines if line).encode()).hexdigest()


def build_requirements() -> list[str]:
    """pyproject.toml's ``[build-system] requires``: what ``pip install -e .`` builds course_lib with."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    requires = re.search(r"^\[build-system\]$[^\[]*?^requires\s*=\s*\[(.*?)\]", pyproject, re.MULTILINE | re.DOTALL)
    return re.findall(r"""["']([^"']+)["']""", requires[1])


def tools() -> list[str]:
    """The pins of what setup installs before the requirements: pip, and the build backend of course_lib."""
    return [PIP, *build_requirements()]


def build_wheelhouse(directory: Path, requirements: Path = REQUIREMENTS, python_version: str | None = None,
                     platforms: Sequence[str] = (), python: Path | None = None) -> dict:
    """Download every wheel the course needs into ``directory`` and describe them in ``wheelhouse.json``.

    The wheels are those of ``requirements``, pip (the version setup installs) and course_lib's build
    backend, for this machine or for the target named by ``python_version`` and ``platforms``.
    Only wheels: the target has no network to fetch what an sdist needs to build. Wheels already in
    ``directory`` are not downloaded again.
    """
    directory = directory.resolve()
    named = named_target(python_version, platforms)  # a wrong name is refused before anything is installed
    python = python or prepare_pip()
    here = describe(python)
    target = {**{key: here[key] for key in ("python_version", "sys_platform", "platform_machine")}, **named}
    if not platforms:  # pip takes the wheels this machine runs: they may need its glibc or macOS
        target.update({floor: here[floor] for floor in ("glibc", "macos") if here[floor]})
    directory.mkdir(parents=True, exist_ok=True)
    options = ["--only-binary=:all:", "--dest", directory]
    wanted = ["-r", requirements, *tools()]
    if named:
        options += ["--implementation", "cp"] + (["--python-version", python_version] if python_version else [])
        options += [option for tag in pip_platforms(platforms) for option in ("--platform", tag)]
        markers = json.dumps(target_markers(python_version, target))
        run(python, "-c", PIP_FOR_TARGET, markers, "download", *options, *wanted)
    else:
        run(python, "-m", "pip", "download", *options, *wanted)
    wheels = sorted(directory.glob("*.whl"))
    manifest = {
        **target,
        "implementation": "cp",
        "platforms": list(platforms),
        "built_on": here,
        "requirements": requirements.name,
        "requirements_sha256": requirements_sha256(requirements),
        "tools": tools(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),  # noqa: UP017 (3.10)
        "wheels": len(wheels),
        "bytes": sum(wheel.stat().st_size for wheel in wheels),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"\n{len(wheels)} wheels, {manifest['bytes'] / 1e6:,.0f} MB, in {directory}: for Python "
          f"{target['python_version']} on {' '.join(platforms) or 'this machine'} "
          f"({target['sys_platform']} {target['platform_machine']})")
    return manifest


def refuse_foreign_wheelhouse(directory: Path, python: Path, requirements: Path = REQUIREMENTS) -> None:
    """Stop, saying why, unless ``directory`` is a wheelhouse made for ``python``'s machine and these requirements."""
    make_one = "make one where there is network with `python3 scripts/course.py wheelhouse DIR` and copy it here"
    if not directory.is_dir():
        raise CourseError(f"{directory}: no such folder; {make_one}")
    if not (directory / MANIFEST).is_file():
        raise CourseError(f"{directory} has no {MANIFEST}, so it is not a wheelhouse this script made; {make_one}")
    built = json.loads((directory / MANIFEST).read_text())
    missing = {"python_version", "sys_platform", "platform_machine", "requirements_sha256", "tools",
               "created"} - built.keys()
    if missing:
        raise CourseError(f"{directory / MANIFEST} lacks {', '.join(sorted(missing))}; {make_one}")
    here = describe(python)
    problems = []
    if built["python_version"] != here["python_version"] or here["implementation"] != "cpython":
        problems.append(f"its wheels are for CPython {built['python_version']}; {python} is "
                        f"{here['implementation']} {here['python_version']}")
    if (built["sys_platform"], built["platform_machine"]) != (here["sys_platform"], here["platform_machine"]):
        problems.append(f"its wheels are for {built['sys_platform']} {built['platform_machine']}; this machine is "
                        f"{here['sys_platform']} {here['platform_machine']}")
    else:
        for floor, name in (("glibc", "glibc"), ("macos", "macOS")):
            if floor in built and version_tuple(here[floor] or "0") < version_tuple(built[floor]):
                problems.append(f"its wheels need {name} {built[floor]} or newer; this machine has "
                                f"{name + ' ' + here[floor] if here[floor] else 'none'}")
    if built["requirements_sha256"] != requirements_sha256(requirements):
        problems.append(f"{requirements.name} has changed since it was made ({built['created']})")
    stale = [pin for pin in built["tools"] if pin not in tools()]
    needed = [pin for pin in tools() if pin not in built["tools"]]
    if stale or needed:  # pip and the build backend, pinned here and in pyproject.toml, not in requirements.txt
        problems.append(f"it was made for {', '.join(stale) or 'no other pins'}; this checkout pins "
                        f"{', '.join(needed) or 'none of them'}")
    if problems:
        tag = platform_tag(here)
        command = f"python3 scripts/course.py wheelhouse DIR --python {here['python_version']}"
        raise CourseError(f"{directory} cannot set up this environment:\n  - " + "\n  - ".join(problems)
                          + "\nMake one for this machine where there is network, copy it here and try again:\n"
                          + f"  {command}{f' --platform {tag}' if tag else ''}")


# --- the book and the checks --------------------------------------------------------------------


def mpiexec() -> Path:
    """The ``mpiexec`` that came with the environment's MPI wheel (or, failing that, the system's)."""
    for name in ("mpiexec", "mpiexec.exe"):
        if (BIN / name).exists():
            return BIN / name
    return Path("mpiexec")


def book_input_files() -> list[Path]:
    """Every file of ``BOOK_INPUTS``, less what running the course writes there (``NOT_BOOK_INPUTS``)."""
    files = []
    for name in BOOK_INPUTS:
        top = ROOT / name
        for path in top.rglob("*") if top.is_dir() else [top]:
            parts = path.relative_to(ROOT).parts
            if path.is_file() and not any(fnmatch.fnmatch(part, skip) for part in parts for skip in NOT_BOOK_INPUTS):
                files.append(path)
    return sorted(files)


def book_inputs_hash() -> str:
    """A hash of the names and contents of ``book_input_files()``: it changes when any of them does."""
    digest = hashlib.sha256()
    for path in book_input_files():
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(ROOT).as_posix()} {content}\n".encode())
    return digest.hexdigest()


def why_build_from_scratch(fresh: bool, inputs: str) -> str | None:
    """Why the previous build must not be reused, given the hash of ``BOOK_INPUTS`` now; None if it may."""
    if fresh:
        return "asked to (--fresh)"
    if not BOOK_STAMP.is_file():
        return "no finished build records what it ran on"
    if BOOK_STAMP.read_text() != inputs:
        return f"something in {', '.join(BOOK_INPUTS)} changed since the last build"
    return None


def build_book(fresh: bool = False) -> Path:
    """Execute the chapters and render the book; a failing cell fails the build.

    Sphinx builds incrementally: it re-executes only the chapters whose own file changed. But a chapter's
    output also depends on ``BOOK_INPUTS`` (course_lib and its results files, the examples it runs, the
    pinned libraries), which Sphinx does not watch. So when their hash differs from the one the last
    build stored in ``BOOK_STAMP``, or with ``fresh``, the old build is removed and every chapter runs
    again. A hash rather than always starting from scratch: editing one chapter's text re-executes that
    chapter only, and a build with nothing changed takes seconds.
    """
    jupyter_book = BIN / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    inputs = book_inputs_hash()
    if reason := why_build_from_scratch(fresh, inputs):
        print(f"Building the book from scratch: {reason}.", flush=True)
        for output in BOOK_OUTPUTS:
            if (BUILD / output).exists():
                shutil.rmtree(BUILD / output)
        BOOK_STAMP.unlink(missing_ok=True)
    run(jupyter_book, "build", ".", "--warningiserror", "--keep-going")
    BOOK_STAMP.write_text(inputs)
    return BUILD / "html" / "index.html"


def build_gpu_edition(card: str) -> Path:
    """Render the book from the outputs a GPU run kept for ``card`` (scripts/gpu_outputs.py), executing nothing.

    The staged sources and their build live apart from the default edition's, under ``BUILD / "gpu"``.
    """
    jupyter_book = BIN / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    source, output = BUILD / "gpu" / "source", BUILD / "gpu"
    run(PYTHON, "scripts/gpu_outputs.py", "stage", "--card", card, "--to", source)
    if (output / "_build").exists():
        shutil.rmtree(output / "_build")
    run(jupyter_book, "build", source, "--path-output", output, "--warningiserror", "--keep-going")
    return output / "_build" / "html" / "index.html"


def test_steps() -> list[tuple[str, list[str | Path]]]:
    """Every check CI runs, in the order a failure is cheapest to find."""
    pytest = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider"]
    return [
        ("lint", [PYTHON, "-m", "ruff", "check", "."]),
        ("exercises match solutions, notebooks stored without outputs", [PYTHON, "scripts/exercises.py", "check"]),
        ("unit tests", [*pytest, "tests", "-m", "not mpi", "--ignore=tests/mpi", "--ignore=tests/slurm",
                        "--ignore=tests/browser"]),
        *[(f"MPI tests on {ranks} ranks", [mpiexec(), "-n", str(ranks), *pytest, "tests/mpi", "-m", "mpi", "-q"])
          for ranks in (2, 3, 4)],  # odd and even rank counts: the ring and the doubling fold differ
        ("Slurm jobs on a local cluster", [*pytest, "tests/slurm", "-q"]),  # skip, saying why, without Slurm
        ("solutions pass their checks", [*pytest, "--nbval-lax", "solutions/"]),
        ("unsolved exercises fail at their checks", [PYTHON, "scripts/exercises.py", "verify-unsolved"]),
        ("book builds from scratch with every chapter executed",
         [PYTHON, "scripts/course.py", "book", "--no-setup", "--fresh"]),
        # the build ran each chapter once, in a fresh kernel, and recorded its time: no second execution
        ("chapters ran on CPU within 90 s each", [PYTHON, "scripts/book_budget.py", "--max-seconds", "90"]),
        ("every page of the book in a browser", [*pytest, "tests/browser", "-q"]),  # skips without Chromium, saying why
    ]


def run_tests() -> int:
    """Run every step, even after a failure, and end with one 'N passed, N failed' line."""
    results = []
    for label, command in test_steps():
        print(f"\n==== {label} ====", flush=True)
        started = time.time()
        ok = subprocess.run([str(c) for c in command], cwd=ROOT).returncode == 0
        results.append((label, ok, time.time() - started))
    print("\n==== summary ====")
    for label, ok, seconds in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}  ({seconds:.0f} s)")
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Set up the course's environment (.venv), build the book or run the tests; "
                    "or download the wheels for a machine with no network.",
        epilog="Both commands work on a machine with no GPU (CPU mode) and on an NVIDIA GPU (GPU mode). "
               "Offline: `wheelhouse DIR` where there is network, then `setup --offline DIR` on the other machine.",
    )
    parser.add_argument("command", choices=["setup", "book", "test", "wheelhouse"],
                        help="setup: only create/update .venv; book: build the HTML book; test: run every check; "
                             "wheelhouse: download every wheel the course needs into DIR, for another machine")
    parser.add_argument("directory", nargs="?", type=Path, metavar="DIR",
                        help="wheelhouse: the folder to fill (wheels already there are kept)")
    parser.add_argument("--no-setup", action="store_true", help="use .venv as it is (skip the install check)")
    parser.add_argument("--fresh", action="store_true",
                        help="book: remove the previous build and execute every chapter again (by default only when "
                             "course_lib, its results files, examples/ or the requirements changed)")
    parser.add_argument("--outputs", choices=["cpu", "gpu"], default="cpu",
                        help="book: cpu (default) executes every chapter on this machine; gpu renders the outputs a "
                             "GPU run kept in course_lib/results/CARD/notebooks (scripts/gpu_check.sh), executing "
                             "nothing")
    parser.add_argument("--card", default="nvidia-h100-80gb-hbm3",
                        help="book --outputs gpu: whose kept outputs (a folder of course_lib/results/)")
    parser.add_argument("--offline", type=Path, metavar="DIR",
                        help="set up .venv from the wheelhouse DIR only, with no network (pip --no-index)")
    target = parser.add_argument_group("wheelhouse target (default: this machine's Python and platform)")
    target.add_argument("--python", metavar="3.Y", help="the target's Python version, e.g. 3.12")
    target.add_argument("--platform", action="append", default=[], metavar="TAG",
                        help="the target's wheel platform tag, e.g. manylinux_2_28_x86_64, macosx_11_0_arm64, "
                             "win_amd64; repeat it to accept several")
    args = parser.parse_args(argv)
    needs = f"the course needs Python {'.'.join(map(str, MIN_PYTHON))} or newer (the pinned NumPy 2.4 does)"
    this_python = f"{sys.executable} is Python {'.'.join(map(str, sys.version_info[:3]))}"
    if args.command == "wheelhouse":
        if args.python is None and sys.version_info[:2] < MIN_PYTHON:
            raise CourseError(f"{needs}; {this_python}: name the target's with --python 3.Y, e.g. 3.12")
        if args.python is not None and version_tuple(args.python)[:2] < MIN_PYTHON:
            raise CourseError(f"--python {args.python}: {needs}")
        if args.directory is None:
            parser.error("wheelhouse needs the folder to fill: wheelhouse DIR")
        if args.offline or args.no_setup:
            parser.error("--offline and --no-setup are for setup, book and test")
        build_wheelhouse(args.directory, python_version=args.python, platforms=args.platform)
        print(f"Copy it, with this checkout, to the other machine and run there:\n"
              f"  python3 scripts/course.py setup --offline {args.directory}")
        return 0
    if args.directory is not None:
        parser.error(f"{args.command} takes no folder; to set up from a wheelhouse: {args.command} --offline DIR")
    if args.python or args.platform:
        parser.error("--python and --platform name the target of wheelhouse")
    if args.no_setup and args.offline:
        parser.error("--no-setup skips the setup that --offline is for: give one of them")
    if args.fresh and args.command != "book":
        parser.error("--fresh is for book (test always builds the book from scratch)")
    if args.outputs != "cpu" and args.command != "book":
        parser.error("--outputs is for book")
    if sys.version_info[:2] < MIN_PYTHON:
        raise CourseError(f"{needs}; {this_python}: run this script with a newer one, e.g. "
                          f"python3.12 scripts/course.py {args.command}")
    if not args.no_setup:
        setup(offline=args.offline)
    elif not PYTHON.exists():
        parser.error(f"{VENV} does not exist yet: run without --no-setup first")
    if args.command == "book":
        index = build_book(fresh=args.fresh) if args.outputs == "cpu" else build_gpu_edition(args.card)
        print(f"\nThe book is built. Open {index.as_uri()}")
    elif args.command == "test":
        return run_tests()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CourseError as refused:
        print(f"\nerror: {refused}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as failed:
        print(f"\nFailed (exit {failed.returncode}): {' '.join(map(str, failed.cmd))}", file=sys.stderr)
        sys.exit(failed.returncode or 1)
