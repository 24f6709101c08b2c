"""Cache keys that follow the code: the compiled tasks carry the code version and can pin the image
digest, and fetch refuses photos that are not the ones the fingerprint task saw."""

import os
import shutil

import pytest
import yaml

from shopvision.components.data.fetch import fetch_photos, fingerprint_location
from shopvision.components.data.fingerprint import data_fingerprint
from shopvision.components.errors import StepError
from shopvision.pipelines import code_version as versions
from shopvision.pipelines.cluster import compile_pipeline

DIGEST = "sha256:" + "0123456789abcdef" * 4


def executors(path) -> dict[str, dict]:
    """{executor: container} of a compiled pipeline: image, command and args are what a KFP backend
    puts in a task's cache key besides its inputs."""
    spec = next(yaml.safe_load_all(path.read_text()))
    return {name: e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}


def compiled_with(version: str, target, monkeypatch) -> dict[str, dict]:
    monkeypatch.setattr(versions, "code_version", lambda: version)
    return executors(compile_pipeline(target))


def test_a_changed_code_version_changes_every_tasks_cache_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPVISION_IMAGE", raising=False)
    old = compiled_with("0.1.0+aaaaaaaaaaaaaaaa", tmp_path / "old.yaml", monkeypatch)
    new = compiled_with("0.1.0+bbbbbbbbbbbbbbbb", tmp_path / "new.yaml", monkeypatch)
    assert old.keys() == new.keys() and len(old) > 5
    for name in old:
        assert old[name]["image"] == new[name]["image"]  # the tag alone would not tell them apart
        assert old[name]["command"] != new[name]["command"], name
        assert "code version 0.1.0+bbbbbbbbbbbbbbbb" in new[name]["command"][-1]


def test_the_compiled_tasks_carry_this_checkouts_code_version(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPVISION_IMAGE", raising=False)
    stamp = f"# shopvision code version {versions.code_version()}\n"
    assert all(
        c["command"][-1].endswith(stamp) for c in executors(compile_pipeline(tmp_path / "p.yaml")).values()
    )


def test_the_code_version_changes_with_any_source_file(tmp_path):
    files = []
    for name, path in versions.source_files()[:3]:
        copy = tmp_path / name.replace(":", "_").replace("/", "_")
        shutil.copy(path, copy)
        files.append((name, copy))
    before = versions.code_version(files)
    assert versions.code_version(files) == before
    files[1][1].write_bytes(files[1][1].read_bytes() + b"\n")
    edited = versions.code_version(files)
    assert edited != before and edited.startswith("0.1.0+")
    assert versions.code_version([(n + "x", p) for n, p in files]) != edited  # a renamed file counts


def test_source_files_cover_every_package_and_skip_the_compiled_yaml():
    names = [name for name, _ in versions.source_files()]
    for expected in (
        "shopvision:cli.py",
        "shopvision.components:data/clean.py",
        "shopvision.pipelines:components.py",
        "shopvision.serving:app.py",
    ):
        assert expected in names
    assert not [n for n in names if "compiled" in n or n.endswith(".yaml")]


def test_an_image_digest_pins_every_task(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPVISION_IMAGE", raising=False)
    try:
        pinned = executors(compile_pipeline(tmp_path / "p.yaml", image_digest=DIGEST))
        assert {c["image"] for c in pinned.values()} == {f"ghcr.io/shopvision/shopvision@{DIGEST}"}
        mine = executors(compile_pipeline(tmp_path / "q.yaml", image=f"registry.local:5000/sv:dev@{DIGEST}"))
        assert {c["image"] for c in mine.values()} == {f"registry.local:5000/sv:dev@{DIGEST}"}
    finally:
        os.environ.pop("SHOPVISION_IMAGE", None)  # compile_pipeline sets it for the reload
    assert versions.pinned_image("registry.local:5000/sv:dev", DIGEST) == f"registry.local:5000/sv@{DIGEST}"
    with pytest.raises(StepError, match="not sha256:<64"):
        versions.pinned_image("ghcr.io/x/y:1", "sha256:1234")
    with pytest.raises(StepError, match="after @"):
        versions.pinned_image("ghcr.io/x/y@latest", None)


def test_fetch_refuses_a_photo_changed_after_the_fingerprint(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw, raw)
    fingerprint = fingerprint_location(str(raw))
    photo = sorted(raw.rglob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[:-4] + b"edit")  # same size, other bytes
    with pytest.raises(StepError, match="changed between the fingerprint task and fetch"):
        fetch_photos(str(raw), tmp_path / "fetched", expected_fingerprint=fingerprint)


def test_fetch_accepts_the_fingerprinted_photos_and_skipped_links_agree(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw, raw)
    outside = tmp_path / "outside.jpg"
    shutil.copy(sorted(raw.rglob("*.jpg"))[0], outside)
    category = sorted(p for p in raw.iterdir() if p.is_dir())[0]
    (category / "linked.jpg").symlink_to(outside)  # fetch skips it, so the fingerprint must too
    fingerprint = fingerprint_location(str(raw))
    count = fetch_photos(str(raw), tmp_path / "fetched", expected_fingerprint=fingerprint)
    assert count == len([p for p in raw.rglob("*") if p.is_file() and not p.is_symlink()])
    assert data_fingerprint(tmp_path / "fetched") == fingerprint
