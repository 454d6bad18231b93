"""Tests of the offline wheelhouse of scripts/course.py: `wheelhouse DIR`, then `setup --offline DIR`.

The wheelhouses here hold a small requirements file (tqdm, pure Python) instead of the course's 1-2 GB,
plus what every wheelhouse holds: pip and course_lib's build backend. Building one downloads from
PyPI, so those tests need the network (CI has it); installing from one runs with pip's configuration
and indexes switched off and every proxy pointing nowhere, so any attempt to reach the network fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(sys.executable)


def load_course() -> ModuleType:
    """Import scripts/course.py, which is a script and not part of a package."""
    spec = importlib.util.spec_from_file_location("course_script", ROOT / "scripts" / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


course = load_course()


def index_unreachable() -> bool:
    """Whether this machine cannot resolve PyPI (an offline GPU node, say): building a wheelhouse downloads."""
    try:
        socket.getaddrinfo("pypi.org", 443)
    except OSError:
        return True
    return False


needs_the_index = pytest.mark.skipif(index_unreachable(), reason="building a wheelhouse downloads from PyPI, and "
                                     "this machine cannot reach it (CI can)")


def requirements_file(folder: Path, *lines: str) -> Path:
    path = folder / "requirements.txt"
    path.write_text("# a small stand-in for the course's requirements\n" + "\n".join(lines) + "\n")
    return path


def wheel_names(folder: Path) -> set[str]:
    """The distribution names and versions of the wheels in a folder: {'tqdm-4.67.1', ...}."""
    return {"-".join(wheel.name.split("-")[:2]).lower() for wheel in folder.glob("*.whl")}


def no_network_for_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip reads no configuration (this machine's extra indexes, find-links, constraints) and reaches no host."""
    for name in list(os.environ):
        if name.startswith("PIP_") or name.lower() == "no_proxy":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")


def manifest_for_here(folder: Path, requirements: Path, **changes: str) -> Path:
    """A wheelhouse.json that describes this Python and machine, with ``changes``: no wheels needed to check it."""
    here = course.describe(HERE)
    manifest = {"python_version": here["python_version"], "sys_platform": here["sys_platform"],
                "platform_machine": here["platform_machine"], "implementation": "cp", "platforms": [],
                "requirements_sha256": course.requirements_sha256(requirements), "tools": course.tools(),
                "created": "2026-01-01T00:00:00Z"}
    folder.mkdir(exist_ok=True)
    (folder / course.MANIFEST).write_text(json.dumps({**manifest, **changes}))
    return folder


@needs_the_index
def test_a_wheelhouse_sets_up_a_fresh_environment_with_no_network(tmp_path, monkeypatch, capsys):
    requirements = requirements_file(tmp_path, "tqdm==4.67.1   # progress bars")
    wheelhouse = tmp_path / "wheelhouse"
    manifest = course.build_wheelhouse(wheelhouse, requirements, python=HERE)

    always = [course.PIP, *course.build_requirements()]  # pip and setuptools, pinned
    assert manifest["tools"] == always
    assert {"tqdm-4.67.1", *(pin.replace("==", "-") for pin in always)} <= wheel_names(wheelhouse)
    here = course.describe(HERE)
    assert json.loads((wheelhouse / "wheelhouse.json").read_text()) == manifest
    assert (manifest["python_version"], manifest["sys_platform"], manifest["platforms"]) == \
        (here["python_version"], here["sys_platform"], [])
    # pip took the wheels this machine runs: an older glibc (or macOS) than this one is refused
    floors = {floor: here[floor] for floor in ("glibc", "macos") if here[floor]}
    assert {floor: manifest.get(floor) for floor in floors} == floors
    for floor, name in (("glibc", "glibc"), ("macos", "macOS")):
        if floor in floors:
            with monkeypatch.context() as older, \
                    pytest.raises(course.CourseError, match=rf"need {name} {here[floor]} or newer; .* has {name} 1\.0"):
                older.setattr(course, "describe", lambda python, floor=floor: {**here, floor: "1.0"})
                course.refuse_foreign_wheelhouse(wheelhouse, HERE, requirements)
    assert manifest["wheels"] == len(list(wheelhouse.glob("*.whl"))) and manifest["bytes"] > 0
    assert f"{manifest['wheels']} wheels" in capsys.readouterr().out

    no_network_for_pip(monkeypatch)
    env = tmp_path / "venv"
    course.setup(offline=wheelhouse, venv_dir=env, requirements=requirements)
    report = subprocess.run(
        [course.venv_python(env), "-c", "import importlib.metadata as m, importlib.util, tqdm; "
         "print(tqdm.__version__, m.version('pip'), importlib.util.find_spec('course_lib').origin)"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert report == ["4.67.1", course.PIP.split("==")[1], str(ROOT / "course_lib" / "__init__.py")]

    capsys.readouterr()
    course.setup(venv_dir=env, requirements=requirements)  # the online setup finds it installed: same stamp
    assert f"Environment {env} is up to date." in capsys.readouterr().out


@needs_the_index
def test_markers_are_those_of_the_target_and_another_machine_is_refused(tmp_path):
    """pip evaluates markers against its own Python; the wheelhouse passes the target's values instead."""
    requirements = requirements_file(tmp_path, "tqdm==4.67.1", 'six==1.17.0 ; python_version < "3.11"')
    wheelhouse = tmp_path / "windows"
    manifest = course.build_wheelhouse(wheelhouse, requirements, python_version="3.10", platforms=["win_amd64"],
                                       python=HERE)

    # colorama: tqdm's `platform_system == "Windows"` dependency; six: requirements' `python_version < "3.11"`
    assert {"tqdm-4.67.1", "colorama-0.4.6", "six-1.17.0"} <= wheel_names(wheelhouse)
    assert {key: manifest[key] for key in ("python_version", "sys_platform", "platform_machine", "platforms")} == \
        {"python_version": "3.10", "sys_platform": "win32", "platform_machine": "AMD64", "platforms": ["win_amd64"]}

    here = course.describe(HERE)
    env = tmp_path / "venv"
    with pytest.raises(course.CourseError, match=r"cannot set up this environment") as refused:
        course.setup(offline=wheelhouse, venv_dir=env, requirements=requirements)
    assert f"this machine is {here['sys_platform']} {here['platform_machine']}" in str(refused.value)
    assert f"wheelhouse DIR --python {here['python_version']}" in str(refused.value)
    assert not env.exists(), "a refused wheelhouse must leave nothing behind"


def test_a_wheelhouse_for_another_python_or_other_requirements_is_refused(tmp_path):
    requirements = requirements_file(tmp_path, "tqdm==4.67.1")
    course.refuse_foreign_wheelhouse(manifest_for_here(tmp_path / "ok", requirements), HERE, requirements)

    with pytest.raises(course.CourseError, match=r"its wheels are for CPython 3\.99; .* is cpython"):
        course.refuse_foreign_wheelhouse(manifest_for_here(tmp_path / "py", requirements, python_version="3.99"),
                                         HERE, requirements)
    with pytest.raises(course.CourseError, match=r"its wheels need (glibc|macOS) 999\.0 or newer"):
        course.refuse_foreign_wheelhouse(manifest_for_here(tmp_path / "old", requirements,
                                                           glibc="999.0", macos="999.0"), HERE, requirements)

    with pytest.raises(course.CourseError, match=r"it was made for pip==25\.0; this checkout pins pip==26\.0\.1"):
        course.refuse_foreign_wheelhouse(manifest_for_here(tmp_path / "pip", requirements,
                                                           tools=["pip==25.0", *course.build_requirements()]),
                                         HERE, requirements)
    with pytest.raises(course.CourseError, match=r"made for no other pins; this checkout pins setuptools=="):
        course.refuse_foreign_wheelhouse(manifest_for_here(tmp_path / "backend", requirements, tools=[course.PIP]),
                                         HERE, requirements)
    (tmp_path / "pip" / course.MANIFEST).write_text(json.dumps(
        {key: value for key, value in json.loads((tmp_path / "ok" / course.MANIFEST).read_text()).items()
         if key != "tools"}))
    with pytest.raises(course.CourseError, match=r"wheelhouse\.json lacks tools; make one"):
        course.refuse_foreign_wheelhouse(tmp_path / "pip", HERE, requirements)

    made = manifest_for_here(tmp_path / "req", requirements)
    requirements.write_text(requirements.read_text() + "# only a comment more\n")
    course.refuse_foreign_wheelhouse(made, HERE, requirements)
    requirements.write_text("tqdm==4.67.0\n")
    with pytest.raises(course.CourseError, match=r"requirements\.txt has changed since it was made \(2026-01-01"):
        course.refuse_foreign_wheelhouse(made, HERE, requirements)


def test_a_missing_folder_or_one_without_wheelhouse_json_is_refused(tmp_path):
    with pytest.raises(course.CourseError, match=r"no such folder; make one where there is network"):
        course.setup(offline=tmp_path / "missing", venv_dir=tmp_path / "venv")
    with pytest.raises(course.CourseError, match=r"has no wheelhouse\.json, so it is not a wheelhouse this script"):
        course.setup(offline=tmp_path, venv_dir=tmp_path / "venv")
    assert not (tmp_path / "venv").exists()

    command = [sys.executable, ROOT / "scripts" / "course.py", "setup", "--offline", tmp_path / "missing"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2 and "no such folder" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(("tag", "facts"), [
    ("manylinux_2_28_x86_64", {"sys_platform": "linux", "platform_machine": "x86_64", "glibc": "2.28"}),
    ("manylinux2014_aarch64", {"sys_platform": "linux", "platform_machine": "aarch64", "glibc": "2.17"}),
    ("linux_x86_64", {"sys_platform": "linux", "platform_machine": "x86_64"}),
    ("macosx_11_0_arm64", {"sys_platform": "darwin", "platform_machine": "arm64", "macos": "11.0"}),
    ("win_amd64", {"sys_platform": "win32", "platform_machine": "AMD64"}),
])
def test_platform_tags_name_the_target(tag, facts):
    assert course.platform_facts(tag) == facts


def test_pip_is_handed_every_older_manylinux_a_target_runs():
    """pip widens macOS and manylinux2014 to older releases itself, but takes manylinux_2_28 literally."""
    widened = course.pip_platforms(["manylinux_2_28_x86_64"])
    assert widened[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"] and "manylinux_2_5_x86_64" in widened
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(widened)
    assert "manylinux2014_x86_64" not in course.pip_platforms(["manylinux_2_16_x86_64"])
    assert course.pip_platforms(["macosx_11_0_arm64", "win_amd64"]) == ["macosx_11_0_arm64", "win_amd64"]


def test_targets_that_cannot_be_one_wheelhouse_are_refused():
    assert course.named_target("3.12", ["manylinux2014_x86_64", "manylinux_2_28_x86_64"]) == \
        {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64", "glibc": "2.28"}
    with pytest.raises(course.CourseError, match="one system and machine"):
        course.named_target(None, ["manylinux_2_28_x86_64", "win_amd64"])
    with pytest.raises(course.CourseError, match="not a platform tag"):
        course.named_target(None, ["manylinux_x86_64"])
    with pytest.raises(course.CourseError, match=r"3\.Y or 3\.Y\.Z"):
        course.named_target("312", [])


def test_the_command_line_keeps_wheelhouse_options_to_wheelhouse(capsys):
    for argv, message in [(["wheelhouse"], "wheelhouse needs the folder"),
                          (["wheelhouse", "wh", "--offline", "wh"], "--offline and --no-setup are for"),
                          (["setup", "wh"], "setup --offline DIR"),
                          (["test", "--platform", "win_amd64"], "--python and --platform name the target"),
                          (["setup", "--no-setup", "--offline", "wh"], "give one of them")]:
        with pytest.raises(SystemExit):
            course.main(argv)
        assert message in capsys.readouterr().err


def test_an_older_python_is_refused_up_front_but_may_make_a_wheelhouse_for_a_newer_one(monkeypatch, tmp_path):
    monkeypatch.setattr(course, "MIN_PYTHON", (99, 0))  # as if this Python were too old
    for command in ("setup", "book", "test"):
        with pytest.raises(course.CourseError, match=r"needs Python 99\.0 or newer .*: run this script with a newer"):
            course.main([command, "--no-setup"])
    with pytest.raises(course.CourseError, match=r"name the target's with --python 3\.Y"):
        course.main(["wheelhouse", str(tmp_path)])
    with pytest.raises(course.CourseError, match=r"--python 3\.12: the course needs Python 99\.0 or newer"):
        course.main(["wheelhouse", str(tmp_path), "--python", "3.12"])
    assert not list(tmp_path.iterdir()), "a refused request must leave nothing behind"


def test_the_build_backend_is_read_from_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert course.build_requirements() == pyproject["build-system"]["requires"]
