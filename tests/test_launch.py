"""Launching the notebooks elsewhere: the setup cell every notebook starts with, the hosted install, Binder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_cell, hosted_setup = load_script("setup_cell"), load_script("hosted_setup")


def test_every_notebook_starts_with_the_current_setup_cell():
    assert setup_cell.stale() == [], "run: python scripts/setup_cell.py sync"
    url = setup_cell.repository_url()
    for path in (ROOT / "exercises").glob("*.ipynb"):  # generated from the solutions, so they carry it too
        assert json.loads(path.read_text())["cells"][0] == setup_cell.setup_cell(url), path.name


def test_the_setup_cell_clones_the_configured_repository_and_is_hidden_in_the_book():
    cell = setup_cell.setup_cell("https://example.org/course.git")
    source = "".join(cell["source"])
    assert 'REPOSITORY = "https://example.org/course.git"' in source
    assert "course/scripts/hosted_setup.py" in source and (ROOT / "scripts" / "hosted_setup.py").exists()
    assert cell["metadata"]["tags"] == ["remove-cell"]


def test_the_setup_cell_does_nothing_where_the_course_is_installed(tmp_path):
    code = "".join(setup_cell.setup_cell("https://invalid.example/none.git")["source"])
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing cloned, nothing installed


def test_sync_replaces_an_old_cell_and_keeps_the_rest(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "solutions").mkdir()
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://example.org/new\n")
    old = setup_cell.setup_cell("https://example.org/old")
    title = {"cell_type": "markdown", "id": "title", "metadata": {}, "source": ["# A chapter"]}
    (tmp_path / "book" / "a.ipynb").write_text(json.dumps({"cells": [old, title], "metadata": {}}))
    (tmp_path / "solutions" / "b.ipynb").write_text(json.dumps({"cells": [title], "metadata": {}}))
    assert setup_cell.sync(tmp_path) == ["book/a.ipynb", "solutions/b.ipynb"]
    for name in ("book/a.ipynb", "solutions/b.ipynb"):
        cells = json.loads((tmp_path / name).read_text())["cells"]
        assert cells == [setup_cell.setup_cell("https://example.org/new"), title]
    assert setup_cell.stale(tmp_path) == []


REQUIREMENTS = """\
numpy==2.4.6                 # a comment
cupy-cuda13x==14.2.0 ; sys_platform == "linux"
nvidia-nvvm==13.0.88 ; sys_platform == "linux"
nvidia-nccl-cu13==2.28.9 ; sys_platform == "linux" and platform_machine in "x86_64 aarch64"   # NCCL

# --- book and notebooks ------
jupyterlab==4.4.10
"""


@pytest.mark.parametrize("cuda_major", [None, 13])
def test_hosted_install_takes_the_runtime_requirements_as_pinned(cuda_major):
    assert hosted_setup.runtime_requirements(REQUIREMENTS, cuda_major) == [
        "numpy==2.4.6", 'cupy-cuda13x==14.2.0 ; sys_platform == "linux"',
        'nvidia-nvvm==13.0.88 ; sys_platform == "linux"',
        'nvidia-nccl-cu13==2.28.9 ; sys_platform == "linux" and platform_machine in "x86_64 aarch64"']


def test_a_cuda_12_driver_gets_the_cuda_12_builds():
    assert hosted_setup.runtime_requirements(REQUIREMENTS, 12) == [
        "numpy==2.4.6", 'cupy-cuda12x==14.2.0 ; sys_platform == "linux"',
        'nvidia-nccl-cu12==2.28.9 ; sys_platform == "linux" and platform_machine in "x86_64 aarch64"']


def test_every_cuda_13_requirement_has_a_cuda_12_answer():
    """A CUDA 13 package added to requirements.txt must be given its CUDA 12 build (or None) in CUDA12."""

    def is_cuda13(requirement: str) -> bool:
        name, version = hosted_setup.package_name(requirement), requirement.split(";")[0].split("==")[1].strip()
        return name.startswith(("nvidia-", "cuda-", "cupy-")) and (version.startswith("13.") or "13" in name)

    text = (ROOT / "requirements.txt").read_text()
    cuda13 = {hosted_setup.package_name(r) for r in hosted_setup.runtime_requirements(text, 13) if is_cuda13(r)}
    assert len(cuda13) >= 5 and cuda13 <= set(hosted_setup.CUDA12), cuda13 - set(hosted_setup.CUDA12)


def test_hosted_install_dry_run_names_the_driver_and_installs_nothing():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "hosted_setup.py"), "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "runtime requirements" in result.stdout and "numpy==" in result.stdout
    assert "jupyterlab" not in result.stdout  # a hosted service keeps its own Jupyter


def test_binder_builds_from_the_pinned_requirements():
    assert (ROOT / "binder" / "requirements.txt").read_text().splitlines()[-1] == "-r ../requirements.txt"
    assert "--editable ." in (ROOT / "binder" / "postBuild").read_text()
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
