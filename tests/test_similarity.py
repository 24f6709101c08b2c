"""features, similar, audit: embeddings, exact search and the mislabelling audit on real sample photos.

The model is a randomly initialised ResNet-18 at 64 px saved like a trained one: its pooled features
still depend on the image, so near-identical copies of a photo (re-encoded, resized, cropped by a few
pixels) are each other's nearest neighbours by a wide margin (cosine ~0.999 against at most ~0.99 for
other photos), which is all the audit test relies on. Category-level meaning is not assumed.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shopvision.components.data.images import decode_image
from shopvision.components.errors import StepError
from shopvision.components.similarity.audit import (
    CategoryPair,
    audit,
    confusable_pairs,
    find_mislabelled,
    other_listing_neighbours,
)
from shopvision.components.similarity.embedding_index import load_index, load_index_model, search
from shopvision.components.similarity.features import embed_images, extract_features
from shopvision.components.similarity.similar import find_similar
from shopvision.components.training.models import ModelSpec, build_model, save_classifier

# (source photo, the category it is wrongly filed under as another seller's listing)
MISFILED = [
    ("Avocado/train_Avocado_003.jpg", "Kiwi"),
    ("Pineapple/train_Pineapple_002.jpg", "Watermelon"),
    ("Lemon/train_Lemon_005.jpg", "Banana"),
]


def shopvision(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("shopvision", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def near_copies(image: Image.Image) -> list[bytes]:
    """Six near-identical versions of a photo, as another listing of it would be."""
    w, h = image.size
    return [
        _jpeg(image, quality=70),
        _jpeg(image.resize((int(w * 0.8), int(h * 0.8)))),
        _jpeg(image.resize((int(w * 0.9), int(h * 0.9)))),
        _jpeg(image.resize((int(w * 1.1), int(h * 1.1)))),
        _jpeg(image.resize((int(w * 1.25), int(h * 1.25)))),
        _jpeg(image.crop((w // 50, h // 50, w - w // 50, h - h // 50))),
    ]


@pytest.fixture(scope="module")
def model_dir(sample_raw, tmp_path_factory) -> Path:
    labels = sorted(p.name for p in sample_raw.iterdir() if p.is_dir())
    spec = ModelSpec("resnet18", labels, image_size=64)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_classifier(directory, build_model(spec).eval(), spec)
    return directory


@pytest.fixture(scope="module")
def index_dir(sample_raw, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index")
    extract_features(model_dir, sample_raw, out, batch_size=32, device="cpu", show_progress=False)
    return out


@pytest.fixture(scope="module")
def misfiled_data(sample_raw, tmp_path_factory) -> Path:
    """The sample, plus six near copies of each MISFILED photo in its right category, plus one more
    copy (another seller's listing) filed under the wrong category, plus a file that is no photo."""
    data = tmp_path_factory.mktemp("misfiled") / "raw"
    shutil.copytree(sample_raw, data)
    for n, (source, wrong) in enumerate(MISFILED):
        image = Image.open(sample_raw / source).convert("RGB")
        right = source.split("/")[0]
        for i, copy in enumerate(near_copies(image)):
            (data / right / f"relisted-{n}-{i}.jpg").write_bytes(copy)
        (data / wrong / f"misfiled-{n}.jpg").write_bytes(_jpeg(image, quality=85))
    (data / "Kiwi" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a photo")
    return data


def test_features_and_embed_images_agree(index_dir, sample_raw):
    index = load_index(index_dir)
    info = json.loads((index_dir / "features.json").read_text())
    assert len(index) == info["count"] == 174 and index.dims == info["dims"] == 512
    assert index.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    assert index.paths[0] == "Avocado/train_Avocado_001.jpg"
    assert (index.categories[0], index.product_ids[0]) == ("Avocado", "train_Avocado_001")
    assert info["model"]["arch"] == "resnet18" and info["per_category"]["Banana"] == 24

    # What the server would do with uploads: decode, then embed_images with the index's own model.
    network, spec = load_index_model(index, "cpu")
    chosen = [0, 57, 173]
    images = [decode_image((sample_raw / index.paths[i]).read_bytes()).image for i in chosen]
    served = embed_images(network, spec, images, "cpu")
    assert served.shape == (3, 512) and served.dtype == np.float32
    np.testing.assert_allclose(served, index.embeddings[chosen], atol=1e-5)


def test_search_finds_each_photo_itself_first_and_handles_k_beyond_the_index(index_dir):
    index = load_index(index_dir)
    queries = np.asarray(index.embeddings[:20])
    scores, positions = search(index, queries, 5)
    assert positions.shape == (20, 5)
    assert positions[:, 0].tolist() == list(range(20))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()

    scores, positions = search(index, queries[:2], len(index) + 50)
    assert positions.shape == (2, len(index))
    assert sorted(positions[0].tolist()) == list(range(len(index)))

    # Tiny blocks (many slices and query chunks) give the same answer as one block.
    small_scores, small_positions = search(index, queries, 7, block=16)
    big_scores, big_positions = search(index, queries, 7)
    np.testing.assert_array_equal(small_positions, big_positions)
    np.testing.assert_allclose(small_scores, big_scores, atol=1e-6)

    with pytest.raises(StepError, match="do not fit"):
        search(index, np.ones((1, 3), dtype=np.float32), 1)


def test_find_similar_answers_good_queries_and_lists_bad_ones(index_dir, sample_raw, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    query = sample_raw / "Kiwi" / "train_Kiwi_003.jpg"
    result = find_similar(index_dir, [query, bad, tmp_path / "missing.jpg"], k=3, device="cpu")
    assert [q.query for q in result.queries] == [query]
    top = result.queries[0].neighbours[0]
    assert (top.path, top.category, top.rank) == (query, "Kiwi", 1) and top.similarity == pytest.approx(1.0)
    assert {(u.path.name, u.reason) for u in result.unreadable} == {
        ("bad.jpg", "not_an_image"),
        ("missing.jpg", "cannot_read"),
    }


def test_similar_cli(index_dir, sample_raw, tmp_path):
    query = sample_raw / "Lemon" / "train_Lemon_002.jpg"
    done = shopvision("similar", "--index", str(index_dir), str(query), "-k", "1000", "--output", "json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    neighbours = answer["queries"][0]["neighbours"]
    assert answer["k"] == len(neighbours) == 174
    assert neighbours[0]["path"] == str(query) and neighbours[0]["category"] == "Lemon"

    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(query.read_bytes()[:500])
    done = shopvision("similar", "--index", str(index_dir), str(bad), str(query), "-k", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "truncated.jpg" in done.stderr and "could not be read as photos" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(query) and str(query) in lines[2]  # its own answer still printed, itself first


def test_audit_lists_the_misfiled_photos_with_their_right_category(misfiled_data, model_dir, tmp_path):
    index_dir, out = tmp_path / "index", tmp_path / "audit"
    done = shopvision("features", "--model", str(model_dir), str(misfiled_data), "--out", str(index_dir))
    assert done.returncode == 0, done.stderr
    info = json.loads((index_dir / "features.json").read_text())
    assert info["count"] == 174 + 7 * len(MISFILED)
    assert [u["path"] for u in info["unreadable"]] == ["Kiwi/broken.jpg"]

    done = shopvision("audit", "--index", str(index_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with (out / "mislabelled.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    flagged = {row["path"]: row for row in rows}
    # Their share and similarity are the highest, so they head the list.
    assert {row["path"] for row in rows[: len(MISFILED)]} == {
        f"{wrong}/misfiled-{n}.jpg" for n, (_, wrong) in enumerate(MISFILED)
    }
    for n, (source, wrong) in enumerate(MISFILED):
        row = flagged[f"{wrong}/misfiled-{n}.jpg"]
        assert row["category"] == wrong and row["suggested_category"] == source.split("/")[0]
        assert float(row["share"]) >= 0.6
    # The right-category copies of those photos are not accused (one misfiled neighbour is not most).
    assert not [p for p in flagged if "relisted-" in p]

    report = (out / "report.md").read_text()
    assert "misfiled-0.jpg" in report.replace("\\", "")
    thumbs = sorted((out / "thumbs").iterdir())
    assert thumbs and all(f"thumbs/{t.name}" in report for t in thumbs)
    assert Image.open(thumbs[0]).size[0] <= 96
    with (out / "confusable_pairs.csv").open() as handle:
        pairs = list(csv.DictReader(handle))
    assert pairs and float(pairs[0]["mix"]) >= float(pairs[-1]["mix"])


def test_neighbours_leave_out_the_photo_and_its_own_listing():
    # Photos 0 and 1 are one listing and identical; 2 is close to both; 3 is far.
    embeddings = np.array([[1, 0], [1, 0], [0.9, 0.436], [0, 1]], dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    neighbours, similarities = other_listing_neighbours(embeddings, ["p", "p", "q", "r"], k=2)
    assert [row.tolist() for row in neighbours] == [[2, 3], [2, 3], [0, 1], [2, 0]]
    assert similarities[0][0] == pytest.approx(0.9, abs=1e-3)


def test_confusable_pairs_and_mislabelled_on_a_hand_made_table():
    categories = ["A", "A", "A", "B", "B", "C"]
    neighbours = [
        [1, 3],  # A: one A, one B        A→B 1
        [0, 2],  # A: two A
        [3, 4],  # A: two B               A→B 2  (photo 2 looks like B)
        [4, 0],  # B: one B, one A        B→A 1
        [3, 5],  # B: one B, one C        B→C 1
        [4, 3],  # C: two B               C→B 2
    ]
    pairs = confusable_pairs(categories, neighbours)
    assert [(p.category_a, p.category_b) for p in pairs] == [("B", "C"), ("A", "B")]
    bc, ab = pairs
    # B–C: links B→C 1, C→B 2; links from B 4, from C 2: mix 3/6.
    assert (bc.links_a_to_b, bc.links_b_to_a, bc.links_from_a, bc.links_from_b) == (1, 2, 4, 2)
    assert bc.mix == pytest.approx(0.5) and bc.share_b_to_a == pytest.approx(1.0)
    # A–B: A→B 3, B→A 1; links from A 6, from B 4: mix 4/10.
    assert ab == CategoryPair("A", "B", 3, 2, 3, 1, 6, 4, ab.examples)
    assert ab.mix == pytest.approx(0.4) and ab.share_a_to_b == pytest.approx(0.5)
    # Photo pair (0, 3) is linked both ways and counted once among the examples.
    assert sorted((a, b) for a, b, _ in ab.examples) == [(0, 3), (2, 3), (2, 4)]

    found = find_mislabelled(categories, neighbours, min_share=0.6)
    assert [(m.position, m.category, m.suggested_category, m.share) for m in found] == [
        (2, "A", "B", 1.0),
        (5, "C", "B", 1.0),
    ]
    assert [m.position for m in find_mislabelled(categories, neighbours, min_share=0.5)] == [2, 5, 0, 3, 4]


def test_outputs_refuse_a_foreign_folder_and_bad_arguments(index_dir, model_dir, sample_raw, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StepError, match="refusing to write"):
        extract_features(model_dir, sample_raw, foreign, show_progress=False)
    with pytest.raises(StepError, match="refusing to write"):
        audit(index_dir, foreign, show_progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(StepError, match="min share"):
        audit(index_dir, tmp_path / "a", min_share=1.5, show_progress=False)
    with pytest.raises(StepError, match="not a finished embedding index"):
        load_index(tmp_path)
