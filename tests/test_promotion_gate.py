"""The promotion gate against a real `mlflow server`: frozen test set, training overlap, significance, lease.

Data: split folders made here from the project's real sample photos (hard links, and a split.json in
the format `split` writes, content hashes computed here with hashlib). The main one, R1, tests on
Banana 20, Carrots 6 and Kiwi 2 photos (28) and trains on Lemon, Avocado and Pineapple photos.

Models: constant classifiers (tiny_models.py), so every photo's verdict is known in advance and the
discordant counts can be worked out by hand: on R1 "always Banana" is right on the 20 Banana photos,
"always Carrots" on the 6 Carrots, "always Lemon" on none. Each is logged from its own real run with
the training-photo record the train step writes (`data/training_photos.txt.gz`, 16-hex prefixes of
the train/val photos' hashes): the clean runs record R1's train photos; "lemon_leaky" also records
two of R1's Banana test photos; "lemon_unknown" records nothing, like a run from before the record.

One server for the module; every test uses a fresh registered model name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow_server import start_mlflow_server, stop_mlflow_server
from tiny_models import constant_model

from shopvision.cli import main
from shopvision.components.data.split import read_frozen_hashes
from shopvision.components.errors import StepError
from shopvision.components.registry.evaluation_set import (
    TAG_CREATED,
    TAG_FINGERPRINT,
    TAG_PHOTOS,
    fetch_frozen_set,
)
from shopvision.components.registry.lease import LEASE_TAG, RegistryLease
from shopvision.components.registry.promotion import promote, promote_summary
from shopvision.components.registry.register import CHAMPION, PREVIOUS, aliases, register
from shopvision.components.registry.significance import paired_comparison
from shopvision.components.training.tracking import log_classifier

SHOPVISION = Path(sys.executable).parent / "shopvision"
FAST = {"lease_settle": 0.1, "device": "cpu"}  # one server on loopback: 0.1 s settles any race here


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def photos(sample_raw: Path, category: str, start: int, stop: int) -> list[Path]:
    return sorted((sample_raw / category).iterdir())[start:stop]


def split_root(root: Path, splits: dict[str, list[Path]]) -> Path:
    """A split folder: ROOT/<split>/<category>/<photo> (hard links) and split.json with content hashes."""
    entries = []
    for split_name, files in splits.items():
        for photo in files:
            category = photo.parent.name
            target = root / split_name / category / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(photo, target)
            entries.append(
                {
                    "file": f"{category}/{photo.name}",
                    "category": category,
                    "product_id": photo.stem,
                    "sha256": sha256(photo),
                    "group": f"{category}/{photo.stem}",
                    "split": split_name,
                }
            )
    (root / "split.json").write_text(json.dumps({"step": "split", "photos": entries}))
    return root


@pytest.fixture(scope="module")
def data(sample_raw, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("gate-data")
    r1_test = photos(sample_raw, "Banana", 0, 20) + photos(sample_raw, "Carrots", 0, 6)
    r1_test += photos(sample_raw, "Kiwi", 0, 2)
    train = [p for c in ("Lemon", "Avocado", "Pineapple") for p in photos(sample_raw, c, 0, 4)]
    r1 = split_root(base / "r1", {"train": train[:9], "val": train[9:], "test": r1_test})
    # R2: a later split that ignored the frozen set: 3 of R1's test photos are gone, the other 25 are
    # in val, and test holds 8 Carrots photos R1 never had.
    dropped, kept = r1_test[:3], r1_test[3:]
    new_test = photos(sample_raw, "Carrots", 6, 14)
    r2 = split_root(base / "r2", {"train": train, "val": kept, "test": new_test})
    # R3: the demo's size: 27 test photos on which Banana beats Carrots by one photo.
    r3_test = photos(sample_raw, "Banana", 0, 13) + photos(sample_raw, "Carrots", 0, 12)
    r3 = split_root(base / "r3", {"train": train, "test": r3_test + photos(sample_raw, "Kiwi", 0, 2)})
    return {
        "r1": r1,
        "r2": r2,
        "r3": r3,
        "r1_test": {sha256(p): p.parent.name for p in r1_test},
        "dropped": {sha256(p) for p in dropped},
        "new_test": {sha256(p) for p in new_test},
        "train": [sha256(p) for p in train],
        "leaked": [sha256(p) for p in r1_test[:2]],
    }


class Gate:
    """The server, its client, and one logged run per model kind (logged once, registered many times)."""

    def __init__(self, url: str, model_dirs: dict[str, Path], trained: dict, scratch: Path) -> None:
        self.url, self.model_dirs, self.trained, self.scratch = url, model_dirs, trained, scratch
        self.client = MlflowClient(tracking_uri=url, registry_uri=url)
        self.runs: dict[str, str] = {}
        self.count = 0

    def run_id(self, kind: str) -> str:
        if kind not in self.runs:
            with mlflow.start_run(run_name=kind) as run:
                mlflow.log_param("arch", "resnet18")
                log_classifier(self.model_dirs[kind.split("_")[0]])
                hashes = self.trained[kind]
                if hashes is not None:
                    record = self.scratch / kind / "training_photos.txt.gz"
                    record.parent.mkdir()
                    with gzip.open(record, "wt") as handle:
                        handle.write("".join(f"{h}\n" for h in sorted({h[:16] for h in hashes})))
                    mlflow.log_artifact(str(record), "data")
            self.runs[kind] = run.info.run_id
        return self.runs[kind]

    def new_model(self, *kinds: str) -> tuple[str, list[str]]:
        """A fresh registered model with one version per kind, in that order."""
        self.count += 1
        name = f"gate-{self.count}"
        return name, [register(self.run_id(k), name, tracking_uri=self.url).version for k in kinds]

    def promote(self, name: str, version: str, data: Path, **options) -> object:
        return promote(name, version, data, tracking_uri=self.url, **{**FAST, **options})

    def command(self, name: str, version: str, data: Path, *flags: str) -> list[str]:
        return [
            "promote", "--name", name, "--version", version, "--data", str(data),
            "--tracking-uri", self.url, "--device", "cpu", *flags,
        ]  # fmt: skip

    def aliases(self, name: str) -> dict[str, str]:
        return aliases(self.client, name)

    def tags(self, name: str, version: str) -> dict[str, str]:
        return self.client.get_model_version(name, version).tags

    def model_tags(self, name: str) -> dict[str, str]:
        return self.client.get_registered_model(name).tags


@pytest.fixture(scope="module")
def gate(data, tmp_path_factory):
    models = tmp_path_factory.mktemp("gate-models")
    labels = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "data/sample/raw").iterdir())
    model_dirs = {c.lower(): constant_model(models / c, labels, c) for c in ("Banana", "Carrots", "Lemon")}
    trained = {
        "banana": data["train"],
        "carrots": data["train"],
        "lemon": data["train"],
        "lemon_leaky": data["train"] + data["leaked"],
        "lemon_unknown": None,
    }
    server_dir = tmp_path_factory.mktemp("gate-mlflow")
    url, process = start_mlflow_server(server_dir)
    try:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("gate-tests")
        yield Gate(url, model_dirs, trained, tmp_path_factory.mktemp("gate-records"))
    finally:
        mlflow.set_tracking_uri(None)
        stop_mlflow_server(process)


# ------------------------------------------------------------------------------ the frozen test set


def test_the_first_promotion_freezes_the_test_set_and_later_ones_score_on_it(gate, data, tmp_path):
    name, (carrots, banana, carrots_again) = gate.new_model("carrots", "banana", "carrots")
    first = gate.promote(name, carrots, data["r1"])
    assert first.promoted and first.evaluation.stored is None
    fingerprint = hashlib.sha256("\n".join(sorted(data["r1_test"])).encode()).hexdigest()
    tags = gate.model_tags(name)
    assert (tags[TAG_PHOTOS], tags[TAG_FINGERPRINT], tags[TAG_CREATED]) == ("28", fingerprint, carrots)
    frozen_file = fetch_frozen_set(name, tmp_path / "frozen.json", tracking_uri=gate.url)
    body = json.loads(frozen_file.read_text())
    assert body["photos"] == data["r1_test"] and body["fingerprint"] == fingerprint and body["model"] == name
    assert read_frozen_hashes(frozen_file) == set(data["r1_test"])  # what split reads
    assert gate.tags(name, carrots)["promotion.evaluation_set_fingerprint"] == fingerprint

    # R2 tests on 8 Carrots photos only: scored there, Banana would get 0 of 8 and be rejected. Scored
    # on the 25 frozen photos R2 still holds (in val), it gets 17 right, Carrots 6: b=17, c=6, p=0.035.
    second = gate.promote(name, banana, data["r2"], add_test_photos=False)
    assert (second.candidate.correct, second.candidate.images) == (17, 25)
    assert (second.champion.correct, second.champion.images) == (6, 25)
    assert (second.evaluation.missing, second.evaluation.added) == (3, 0)
    assert second.promoted, second.reason
    tags = gate.tags(name, banana)
    assert (tags["promotion.evaluation_photos"], tags["promotion.evaluation_photos_missing"]) == ("25", "3")
    assert tags["promotion.evaluation_set_fingerprint"] == fingerprint
    assert "28 photos (frozen at v" in promote_summary(second)
    assert "3 of them are not in this data and were not scored" in promote_summary(second)
    assert gate.model_tags(name)[TAG_FINGERPRINT] == fingerprint  # nothing added, nothing stored

    # By default R2's new test photos join the set; given R2/test, the split.json beside it is read.
    third = gate.promote(name, carrots_again, data["r2"] / "test")
    assert (third.evaluation.added, third.evaluation.missing) == (8, 3)
    assert (third.candidate.correct, third.candidate.images) == (6 + 8, 33)
    assert not third.promoted and "is below" in third.reason  # Banana: 17 of 33
    grown = json.loads(fetch_frozen_set(name, tmp_path / "grown.json", tracking_uri=gate.url).read_text())
    assert set(grown["photos"]) == set(data["r1_test"]) | data["new_test"]  # added to, nothing removed
    tags = gate.model_tags(name)
    assert (tags[TAG_PHOTOS], tags[TAG_CREATED]) == ("36", carrots)
    assert tags[TAG_FINGERPRINT] == grown["fingerprint"] != fingerprint
    assert gate.aliases(name) == {CHAMPION: banana, PREVIOUS: carrots}


def test_fetch_frozen_set_before_any_promotion(gate, tmp_path):
    dest = tmp_path / "none.json"
    assert fetch_frozen_set("no-such-model", dest, tracking_uri=gate.url) is None
    assert json.loads(dest.read_text()) == {} and read_frozen_hashes(dest) == set()
    name, _ = gate.new_model("carrots")  # registered, never promoted
    assert fetch_frozen_set(name, dest, tracking_uri=gate.url) is None


# ------------------------------------------------------------------------------ training overlap


def test_a_candidate_or_champion_that_trained_on_the_frozen_set_is_refused(gate, data):
    name, (carrots, leaky, banana) = gate.new_model("carrots", "lemon_leaky", "banana")
    assert gate.promote(name, carrots, data["r1"]).promoted
    refused = gate.promote(name, leaky, data["r1"])
    assert not refused.promoted
    assert (
        f"the candidate v{leaky} trained on 2 of the 28 photos of the frozen evaluation set" in refused.reason
    )
    assert gate.aliases(name) == {CHAMPION: carrots}
    assert gate.tags(name, leaky)["promotion.decision"] == "rejected"

    # A champion that trained on it (here moved there by hand) is refused too, unless --force.
    gate.client.set_registered_model_alias(name, CHAMPION, leaky)
    refused = gate.promote(name, banana, data["r1"])
    assert not refused.promoted and f"the champion v{leaky} trained on 2" in refused.reason
    assert "--force" in refused.reason
    assert gate.aliases(name) == {CHAMPION: leaky}
    forced = gate.promote(name, banana, data["r1"], force=True)  # Banana 20 of 28 vs 0: significant
    assert forced.promoted and any("inflated" in note for note in forced.notes)
    assert gate.aliases(name) == {CHAMPION: banana, PREVIOUS: leaky}


def test_unknown_training_photos_are_refused_unless_allowed(gate, data, capsys):
    name, (unknown, carrots) = gate.new_model("lemon_unknown", "carrots")
    command = gate.command(name, unknown, data["r1"], "--lease-settle", "0.1")
    assert main(command) == 0  # a refusal is a decision, not an error
    out = capsys.readouterr().out
    assert "REJECTED" in out and f"the candidate v{unknown}'s training photos are unknown" in out
    assert "--allow-unknown-training-data" in out
    assert gate.aliases(name) == {}
    assert main(command + ["--allow-unknown-training-data"]) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "NOT checked" in out
    # With an unchecked champion new test photos are not added: nothing can be checked against them.
    decision = gate.promote(name, carrots, data["r2"], allow_unknown_training_data=True)
    assert decision.promoted and decision.evaluation.added == 0  # Carrots 6 of 25 vs 0: p = 0.031
    assert "new test photos not added" in promote_summary(decision)


# ------------------------------------------------------------------------------ significance, ties, floors


def test_the_significance_rule_on_hand_computed_counts(gate, data):
    name, (carrots, banana) = gate.new_model("carrots", "banana")
    assert gate.promote(name, carrots, data["r1"]).promoted
    # Banana alone is right on the 20 Banana photos, Carrots alone on the 6 Carrots: p = 0.00936.
    strict = gate.promote(name, banana, data["r1"], alpha=0.005)
    assert not strict.promoted and "not significant" in strict.reason
    assert gate.aliases(name) == {CHAMPION: carrots}
    decision = gate.promote(name, banana, data["r1"])
    assert decision.promoted
    tags = gate.tags(name, banana)
    assert tags["promotion.discordant_candidate_only"] == "20"
    assert tags["promotion.discordant_champion_only"] == "6"
    assert float(tags["promotion.p_value"]) == pytest.approx(2 * 313912 / 2**26)
    assert float(tags["promotion.alpha"]) == 0.05
    expected = paired_comparison(20, 6, 28, 0.05)
    assert float(tags["promotion.difference_ci_low"]) == pytest.approx(expected.ci_low)
    assert float(tags["promotion.difference_ci_high"]) == pytest.approx(expected.ci_high)
    assert 0 < expected.ci_low < 14 / 28 < expected.ci_high
    assert float(tags["promotion.candidate_top1_accuracy"]) == pytest.approx(20 / 28)
    assert float(tags["promotion.champion_top1_accuracy"]) == pytest.approx(6 / 28)
    assert (tags["promotion.evaluation_photos"], tags["promotion.evaluation_photos_missing"]) == ("28", "0")


def test_a_one_photo_gain_on_the_demo_size_is_not_significant(gate, data, capsys):
    name, (carrots, banana) = gate.new_model("carrots", "banana")
    assert gate.promote(name, carrots, data["r3"]).promoted  # 12 of 27
    assert main(gate.command(name, banana, data["r3"], "--lease-settle", "0.1")) == 0  # 13 of 27
    out = capsys.readouterr().out
    assert "paired on 27 photos: candidate alone right on 13, champion alone on 12" in out
    assert "exact McNemar p = 1.0000 (alpha 0.05): not significant" in out
    assert "REJECTED: gain +0.0370 is not significant" in out and "these photos cannot tell them apart" in out
    assert gate.aliases(name) == {CHAMPION: carrots}


def test_ties_and_floors(gate, data):
    name, (carrots, carrots_again, banana) = gate.new_model("carrots", "carrots", "banana")
    floor = gate.promote(name, carrots, data["r1"], min_accuracy=0.5)
    assert not floor.promoted and "below the floor 0.5000" in floor.reason
    assert gate.aliases(name) == {}
    first = gate.promote(name, carrots, data["r1"], min_accuracy=0.2)  # 6/28: no champion, floor only
    assert first.promoted and first.comparison is None
    assert gate.tags(name, carrots)["promotion.p_value"] == "none"
    tie = gate.promote(name, carrots_again, data["r1"])
    assert not tie.promoted and "ties" in tie.reason
    assert (tie.comparison.candidate_only, tie.comparison.champion_only, tie.comparison.p_value) == (
        0,
        0,
        1.0,
    )
    above = gate.promote(name, banana, data["r1"], min_accuracy=0.8)  # significant, but 20/28 < 0.8
    assert not above.promoted and "below the floor" in above.reason
    assert gate.aliases(name) == {CHAMPION: carrots}


# ------------------------------------------------------------------------------ races and leases


def test_a_champion_moved_during_scoring_is_compared_again(gate, data):
    name, (lemon, carrots, banana) = gate.new_model("lemon", "carrots", "banana")
    gate.client.set_registered_model_alias(name, CHAMPION, lemon)
    moved = []

    def move_champion_once(done: int, total: int) -> None:  # runs while the candidate is scored
        if not moved:
            gate.client.set_registered_model_alias(name, CHAMPION, banana)
            moved.append(True)

    decision = gate.promote(name, carrots, data["r1"], progress=move_champion_once)
    assert moved and decision.champion_version == banana
    assert not decision.promoted and "is below" in decision.reason  # vs Lemon it would have won
    assert any(f"moved from v{lemon} to v{banana}" in note for note in decision.notes)
    assert gate.aliases(name) == {CHAMPION: banana}


def test_a_stale_lease_is_taken_over(gate, data):
    name, (carrots,) = gate.new_model("carrots")
    stale = json.dumps({"owner": "ghost-host:4242:dead", "expires": time.time() - 30})
    gate.client.set_registered_model_tag(name, LEASE_TAG, stale)
    decision = gate.promote(name, carrots, data["r1"], lease_wait=5)
    assert decision.promoted
    assert any("took over a stale promotion lease of ghost-host:4242:dead" in note for note in decision.notes)
    assert LEASE_TAG not in gate.model_tags(name)  # released when done


def test_a_live_lease_makes_promote_wait_then_fail_clearly(gate, data, capsys):
    name, (carrots,) = gate.new_model("carrots")
    live = json.dumps({"owner": "other-host:1:alive", "expires": time.time() + 600})
    gate.client.set_registered_model_tag(name, LEASE_TAG, live)
    started = time.monotonic()
    code = main(gate.command(name, carrots, data["r1"], "--lease-wait", "1.5", "--lease-settle", "0.1"))
    assert code == 2 and time.monotonic() - started >= 1.5
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert (
        "other-host:1:alive" in errors[0]
        and "--lease-wait 1.5" in errors[0]
        and "no alias moved" in errors[0]
    )
    assert "waiting for the promotion lease" in err
    assert gate.aliases(name) == {}
    assert gate.model_tags(name)[LEASE_TAG] == live  # another owner's lease is never removed


def test_the_lease_is_renewed_while_held_and_a_lost_one_is_noticed(gate):
    name, _ = gate.new_model("carrots")

    def lease_record() -> dict:
        return json.loads(gate.model_tags(name)[LEASE_TAG])

    with RegistryLease(lambda: MlflowClient(gate.url, gate.url), name, seconds=1.5, settle=0.1) as lease:
        first = lease_record()
        assert first["owner"] == lease.owner
        time.sleep(2.2)  # past the first expiry: only renewal keeps it
        renewed = lease_record()
        assert renewed["owner"] == lease.owner and renewed["expires"] > max(first["expires"], time.time())
        # The renewer reads the tag, then writes it: a write between the two is overwritten (MLflow
        # has no compare-and-set; see lease.py), and the lease is simply ours again. So the thief
        # writes just after a renewal, a third of the lease (0.5 s) before the next one.
        deadline = time.monotonic() + 5
        while lease_record()["expires"] == renewed["expires"]:
            assert time.monotonic() < deadline, "the lease was not renewed again"
            time.sleep(0.01)
        thief = json.dumps({"owner": "thief", "expires": time.time() + 60})
        gate.client.set_registered_model_tag(name, LEASE_TAG, thief)
        with pytest.raises(StepError, match="lost the promotion lease"):
            lease.ensure_held()
    assert gate.model_tags(name)[LEASE_TAG] == thief


def test_two_promotions_at_once_end_with_the_better_champion(gate, data, tmp_path):
    """Two real `shopvision promote` processes for one model; both are made to wait on a held lease,
    then released together, so they race for it in earnest. Neither finds a frozen set yet: the one
    that goes second must score on the set the first one stored."""
    name, (lemon, carrots, banana) = gate.new_model("lemon", "carrots", "banana")
    gate.client.set_registered_model_alias(name, CHAMPION, lemon)
    gate.client.set_registered_model_tag(
        name, LEASE_TAG, json.dumps({"owner": "test-holder", "expires": time.time() + 120})
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    running = {}
    for version in (carrots, banana):
        out, err = tmp_path / f"v{version}.out", tmp_path / f"v{version}.err"
        flags = ("--lease-wait", "90", "--lease-settle", "0.5")
        with open(out, "w") as stdout, open(err, "w") as stderr:
            command = [str(SHOPVISION), *gate.command(name, version, data["r1"], *flags)]
            running[version] = (subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env), out, err)
    try:
        deadline = time.monotonic() + 60
        while not all("waiting for the promotion lease" in err.read_text() for _, _, err in running.values()):
            assert time.monotonic() < deadline, "the promotes never waited for the lease"
            assert all(p.poll() is None for p, _, _ in running.values()), [
                e.read_text() for *_, e in running.values()
            ]
            time.sleep(0.2)
        gate.client.delete_registered_model_tag(name, LEASE_TAG)  # both now race for it
        for process, _, err in running.values():
            assert process.wait(timeout=120) == 0, err.read_text()
    finally:
        for process, _, _ in running.values():
            if process.poll() is None:
                process.kill()
    final = gate.aliases(name)
    assert final[CHAMPION] == banana
    seen = {v: gate.tags(name, v)["promotion.champion_version"] for v in (carrots, banana)}
    # Serialised: whichever ran second decided against the first one's outcome, never both against Lemon.
    assert seen in ({carrots: lemon, banana: carrots}, {banana: lemon, carrots: banana}), seen
    assert final[PREVIOUS] == seen[banana]  # @previous is the champion Banana actually replaced
    tags = gate.model_tags(name)
    assert LEASE_TAG not in tags and tags[TAG_PHOTOS] == "28"
    outputs = {v: out.read_text() for v, (_, out, _) in running.items()}
    assert all("waited" in text for text in outputs.values()), outputs
    assert sum("frozen now" in text for text in outputs.values()) == 1, outputs  # the other one reused it
