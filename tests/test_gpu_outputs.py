"""scripts/gpu_outputs.py: a GPU run's outputs carried into today's chapters, refused when the code moved on."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GPU_FACTS = {"mode": "gpu", "name": "NVIDIA H100 80GB HBM3", "driver_cuda_version": 13000,
             "libraries": {"cupy-cuda13x": "14.2.0", "numpy": "2.4.6"}}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_outputs", ROOT / "scripts" / "gpu_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_outputs = load_script()


def notebook(*cells: tuple[str, str]) -> dict:
    return {"cells": [{"cell_type": kind, "metadata": {}, "source": text,
                       **({"outputs": [], "execution_count": None} if kind == "code" else {})} for kind, text in cells],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def executed_copy(source: dict, facts: dict = GPU_FACTS) -> dict:
    """``source`` as if a GPU had run it: each code cell printed its own number."""
    ran = copy.deepcopy(source)
    for number, cell in enumerate(c for c in ran["cells"] if c["cell_type"] == "code"):
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": f"ran on the GPU {number}\n"}]
        cell["execution_count"] = number + 1
    gpu_outputs.stamp(ran, facts, "2026-12-07T12:00:00+00:00", 3.2)
    return ran


CHAPTER = notebook(("markdown", "# A chapter"), ("code", "x = 1"), ("markdown", "Prose."), ("code", "print(x)"))


def test_outputs_move_into_todays_notebook_and_prose_may_change():
    edited = copy.deepcopy(CHAPTER)
    edited["cells"][2]["source"] = "Prose, rewritten after the GPU run."
    staged = gpu_outputs.transplant(edited, executed_copy(CHAPTER), "ch.ipynb")
    assert staged["cells"][2]["source"] == "Prose, rewritten after the GPU run."
    assert [c["outputs"][0]["text"] for c in staged["cells"] if c["cell_type"] == "code"] == [
        "ran on the GPU 0\n", "ran on the GPU 1\n"]
    assert staged["metadata"]["course_outputs"]["device"] == "NVIDIA H100 80GB HBM3"
    assert edited["cells"][1]["outputs"] == []  # the source notebook itself is left alone


@pytest.mark.parametrize("change, message", [
    (lambda nb: nb["cells"][3].update(source="print(x + 1)"), "code changed since the GPU run of 2026-12-07"),
    (lambda nb: nb["cells"].append({"cell_type": "code", "metadata": {}, "source": "y = 2", "outputs": [],
                                    "execution_count": None}), "code changed"),
])
def test_outputs_of_other_code_are_refused(change, message):
    edited = copy.deepcopy(CHAPTER)
    change(edited)
    with pytest.raises(gpu_outputs.StageError, match=message):
        gpu_outputs.transplant(edited, executed_copy(CHAPTER), "ch.ipynb")


def test_cpu_outputs_and_unstamped_copies_are_refused():
    with pytest.raises(gpu_outputs.StageError, match="produced in cpu mode"):
        gpu_outputs.transplant(CHAPTER, executed_copy(CHAPTER, GPU_FACTS | {"mode": "cpu"}), "ch.ipynb")
    with pytest.raises(gpu_outputs.StageError, match="no 'course_outputs' stamp"):
        gpu_outputs.transplant(CHAPTER, copy.deepcopy(CHAPTER), "ch.ipynb")


def test_the_whole_book_stages_with_a_note_on_every_chapter(tmp_path, monkeypatch):
    results = tmp_path / "results"
    kept = results / "some-card" / "notebooks"
    kept.mkdir(parents=True)
    chapters = sorted((ROOT / "book").rglob("*.ipynb"))
    for path in chapters:
        (kept / path.name).write_text(json.dumps(executed_copy(json.loads(path.read_text()))))
    monkeypatch.setattr(gpu_outputs, "RESULTS", results)
    monkeypatch.setattr(gpu_outputs, "ROOT", tmp_path)  # paths in the notes are shown relative to it
    for name in ("_config.yml", "_toc.yml", "book"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.setattr(gpu_outputs, "BOOK_FILES", ("_config.yml", "_toc.yml", "book"))

    lines = gpu_outputs.stage("some-card", tmp_path / "staged")
    assert len(lines) == len(chapters)
    staged = tmp_path / "staged"
    assert yaml.safe_load((staged / "_config.yml").read_text())["execute"]["execute_notebooks"] == "off"
    for path in chapters:
        page = json.loads((staged / path.relative_to(ROOT)).read_text())
        note = "".join(page["cells"][1]["source"])
        assert "GPU mode on an NVIDIA H100 80GB HBM3** on 2026-12-07" in note, path.name
        assert any(c.get("outputs") for c in page["cells"] if c["cell_type"] == "code"), path.name


def test_a_card_with_nothing_kept_is_refused_with_what_to_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_outputs.py"), "stage", "--card",
                             "no-such-card", "--to", str(tmp_path / "staged")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "no GPU outputs are kept for no-such-card" in result.stderr and "gpu_check.sh" in result.stderr
    assert "Traceback" not in result.stderr
