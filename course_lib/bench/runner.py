"""Run a benchmark suite step by step with a progress bar and collect one results dict."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tqdm import tqdm

from course_lib.bench.results import new_result
from course_lib.bench.suites import SUITES
from course_lib.bench.timing import Timing


@dataclass(frozen=True)
class Step:
    """One measurement of a suite: a label for the progress bar and a function that measures."""

    label: str
    measure: Callable[[], dict[str, Any]]


def measurement(label: str, timing: Timing, parameters: dict[str, Any], **derived: float) -> dict[str, Any]:
    """The record a step returns: what was measured, its timing and the figures derived from it."""
    return {"label": label, "parameters": parameters, "timing": timing.asdict(), "derived": derived}


def suite(name: str) -> ModuleType:
    """The suite module for ``name``; the error lists the known names."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(SUITES))}")
    return importlib.import_module(SUITES[name])


def run_suite(name: str, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Measure every step of suite ``name`` on this device and return the results dict (unsaved)."""
    module = suite(name)
    steps = module.steps(quick)
    file_name = module.result_name() if hasattr(module, "result_name") else name  # e.g. one file per TP degree
    result = new_result(file_name, {"quick": quick, **getattr(module, "PARAMETERS", {})})
    for step in tqdm(steps, desc=f"bench {name}", unit="step", disable=not progress):
        result["measurements"].append(step.measure())
    result["headline"] = module.headline(result["measurements"])
    return result
