"""Results files: every measured number in the book comes from one, labelled with where it came from.

``course_lib/results/<card>/<NAME>.json`` holds the card, driver, CUDA and library versions, the
date, the parameters, raw timings (median and spread) and derived figures, plus a ``headline`` object
with the figures an issue's targets name. Files measured in CPU mode go to ``cpu-<processor>/`` and
are never shown as GPU figures.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from course_lib import backend
from course_lib.device_facts import card_slug, cuda_version, device_facts

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
SCHEMA_VERSION = 1


def card_folder(facts: dict[str, Any]) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU; ``cpu-<processor>`` for a CPU-mode run."""
    slug = card_slug(facts["name"])
    return slug if facts["mode"] == "gpu" else f"cpu-{slug}"


def new_result(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """An empty result for benchmark ``name``, stamped with this device, its versions and the date."""
    facts = device_facts()
    return {
        "schema": SCHEMA_VERSION,
        "name": name,
        "card": facts["name"],
        "mode": facts["mode"],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": facts,
        "parameters": parameters,
        "measurements": [],
        "headline": {},
    }


def save_result(result: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``result`` to ``directory/<NAME>.json`` (default: results/<card>/) and return the path."""
    missing = {"name", "card", "date", "device", "measurements", "headline"} - result.keys()
    if missing:
        raise ValueError(f"a result needs the keys {sorted(missing)}; build it with new_result()")
    directory = Path(directory) if directory else RESULTS_DIR / card_folder(result["device"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def gpu_cards() -> list[str]:
    """Card folders that hold GPU results, e.g. ``['nvidia-h100-80gb-hbm3']``."""
    if not RESULTS_DIR.is_dir():
        return []
    return sorted(p.name for p in RESULTS_DIR.iterdir() if p.is_dir() and not p.name.startswith("cpu-"))


def load_result(name: str, card: str | None = None) -> dict[str, Any]:
    """The recorded result of benchmark ``name``.

    ``card`` picks the folder; by default the card this process runs on if it has a file, else the
    first GPU card (alphabetically) that has one. Raises ``FileNotFoundError`` saying what exists.
    """
    cards = [card] if card else _preferred_cards()
    for folder in cards:
        path = RESULTS_DIR / folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    have = {c: sorted(p.stem for p in (RESULTS_DIR / c).glob("*.json")) for c in gpu_cards()}
    raise FileNotFoundError(
        f"no recorded result {name!r} for {cards or 'any GPU card'}; recorded: {have or 'none'}. "
        f"Measure it on a GPU with `python -m course_lib.bench {name}`."
    )


def _preferred_cards() -> list[str]:
    cards = gpu_cards()
    if backend.has_gpu():
        here = card_folder(device_facts())
        cards = [here] + [c for c in cards if c != here]
    return cards


def provenance(result: dict[str, Any]) -> str:
    """One line saying where a number came from: card, date, driver/CUDA and library versions."""
    device, libs = result["device"], result["device"].get("libraries", {})
    parts = [result["card"], f"measured {result['date'][:10]}"]
    if result.get("derived_from"):  # a prediction computed from measurements, not one itself
        parts = [result["card"], f"predicted {result['date'][:10]} from {result['derived_from']}"]
    if device.get("driver_cuda_version"):
        parts.append(f"driver CUDA {cuda_version(device['driver_cuda_version'])}")
    for lib in ("cupy-cuda13x", "cupy-cuda12x", "numba-cuda", "torch"):
        if lib in libs:
            parts.append(f"{lib} {libs[lib]}")
    return ", ".join(parts)


def headline(name: str, key: str, card: str | None = None) -> float:
    """One headline figure of a recorded result, e.g. ``headline("env", "copy_gbps")``."""
    result = load_result(name, card)
    if key not in result["headline"]:
        raise KeyError(f"{name}.json has no headline {key!r}; it has {sorted(result['headline'])}")
    return result["headline"][key]
