"""register, promote, rollback against real `mlflow server` processes: SQLite and PostgreSQL backends.

The candidates are tiny real models (tiny_models.py) whose accuracy on the test folder is known in
advance: on 38 photos (Banana 8, Carrots 8, Lemon 4, nine other categories 2 each) "always Banana"
and "always Carrots" score 8/38 each (a tie), "always Lemon" 4/38 (worse), and the fitted model
nearly 38/38 (better). Models are logged with the project's own `log_classifier`, one run each,
with the params and per-epoch val metrics training records.

Registration, promotion with rollback and the store check run on both backends; the orders of
candidates, the margin, the floor and the unloadable champion do not depend on the store and run on
SQLite only, to keep the file short. PostgreSQL runs as a private cluster in a temporary folder,
started and stopped by the tests (as the `postgres` user when the tests run as root); every server
is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server
from tiny_models import constant_model, fitted_model

import shopvision
from shopvision.cli import main
from shopvision.components.errors import StepError
from shopvision.components.evaluation.evaluate import evaluate
from shopvision.components.registry.promotion import Score, decide, promote
from shopvision.components.registry.register import CHAMPION, PREVIOUS, aliases, register
from shopvision.components.registry.rollback import rollback
from shopvision.components.training.tracking import log_classifier

COUNTS = {"Banana": 8, "Carrots": 8, "Lemon": 4}  # every other category: 2 photos
TOTAL = 38
EXPECTED = {"banana": 8 / TOTAL, "carrots": 8 / TOTAL, "lemon": 4 / TOTAL}  # "fitted" is measured
# These runs record no training photos (the models are made here, not by `train`), so the gate is told
# to accept that; test_promotion_gate.py covers the check itself. One loopback server needs no 1 s settle.
GATE = {"allow_unknown_training_data": True, "lease_settle": 0.1}
GATE_FLAGS = ["--allow-unknown-training-data", "--lease-settle", "0.1"]


# ---------------------------------------------------------------------------- the gate, no server


def _pair(candidate_right: int, champion_right: int, both: int, photos: int = 20) -> tuple[Score, Score]:
    """Per-photo scores: `both` photos right for both, then each model's own, the rest wrong for both."""
    hashes = [f"{i:064x}" for i in range(photos)]
    candidate = {h: i < both or both <= i < both + candidate_right for i, h in enumerate(hashes)}
    champion = {
        h: i < both or both + candidate_right <= i < both + candidate_right + champion_right
        for i, h in enumerate(hashes)
    }
    return Score.of(candidate), Score.of(champion)


def test_decide_strictly_better_by_the_margin_and_above_the_floor():
    # The paired test needs per-photo scores now; 10 discordant photos all the candidate's is p = 0.002.
    assert decide(*_pair(10, 0, 5))[0]
    promoted, why = decide(*_pair(3, 3, 5))
    assert not promoted and "ties" in why  # equal is not promoted, even with min_gain 0
    assert not decide(*_pair(0, 2, 5))[0]
    assert not decide(*_pair(10, 0, 5), min_gain=0.6)[0]
    assert decide(*_pair(10, 0, 5), min_gain=0.5)[0]  # 15/20 - 5/20 == 0.5 despite float rounding
    assert not decide(*_pair(10, 0, 5), min_accuracy=0.8)[0]
    alone = Score(0.1, 2, 20)
    assert decide(alone, None)[0]  # no champion: the default floor is 0
    promoted, why = decide(alone, None, min_accuracy=0.2)
    assert not promoted and "below the floor" in why
    promoted, why = decide(alone, None, champion_error="bad weights")
    assert not promoted and "--force" in why
    assert decide(alone, None, champion_error="bad weights", force=True)[0]
    assert not decide(alone, None, champion_error="bad", force=True, min_accuracy=0.5)[0]


# --------------------------------------------------------------------------------- servers


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _postgres_driver() -> str:
    """The SQLAlchemy driver to name in the URI. SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3,
    so the URI says which driver is installed (psycopg2-binary is the test dependency)."""
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module):
            return driver
    raise RuntimeError("no PostgreSQL driver: pip install psycopg2-binary (a test dependency)")


@contextmanager
def running_postgres():
    """A private PostgreSQL cluster on 127.0.0.1 (trust auth) in a temporary folder; yields its URI.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="shopvision-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    started = False
    try:
        run(
            str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust", "-E", "UTF8", "--no-sync"
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        started = True
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+{_postgres_driver()}://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


class Registry:
    """One running server; each test model is logged (one run each) the first time a test needs it."""

    def __init__(self, url: str, server_dir: Path, backend: str, backend_uri: str | None, model_dirs) -> None:
        self.url, self.server_dir, self.backend, self.backend_uri = url, server_dir, backend, backend_uri
        self.model_dirs = model_dirs
        self.client = MlflowClient(tracking_uri=url, registry_uri=url)
        self._runs: dict[str, str] = {}
        self.model_ids: dict[str, str] = {}
        self.names = 0

    def run_id(self, key: str) -> str:
        if key not in self._runs:
            self._log(key)
        return self._runs[key]

    def _log(self, key: str) -> None:
        with mlflow.start_run(run_name=key) as run:
            mlflow.log_param("data_fingerprint", f"fingerprint-of-{key}")
            mlflow.log_param("arch", "resnet18")
            for epoch, error in enumerate((0.25, 0.5)):  # the best epoch is the first
                mlflow.log_metrics({"val_top1_error": error, "val_top5_error": error / 5}, step=epoch)
            mlflow.set_tag("best_epoch", "0")
            self.model_ids[key] = log_classifier(self.model_dirs[key]).model_id
        self._runs[key] = run.info.run_id
        if key == "broken":
            # Its weights are overwritten in the artifact store, as a lost or damaged file would be:
            # the version registers fine and fails when loaded.
            weights = [
                p
                for p in (self.server_dir / "artifacts").rglob("weights.pt")
                if self.model_ids[key] in str(p)
            ]
            assert len(weights) == 1
            weights[0].write_bytes(b"not a state dict")

    def new_name(self, *keys: str) -> tuple[str, list[str]]:
        """A fresh registered model with one version per key, in that order."""
        self.names += 1
        name = f"shopvision-{self.names}"
        versions = [register(self.run_id(k), name, tracking_uri=self.url).version for k in keys]
        return name, versions

    def aliases(self, name: str) -> dict[str, str]:
        return aliases(self.client, name)

    def tags(self, name: str, version: str) -> dict[str, str]:
        return self.client.get_model_version(name, version).tags


@pytest.fixture(scope="module")
def test_dir(sample_raw, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry-data") / "test"
    for category_dir in sorted(sample_raw.iterdir()):
        target = root / category_dir.name
        target.mkdir(parents=True)
        for photo in sorted(category_dir.iterdir())[: COUNTS.get(category_dir.name, 2)]:
            os.link(photo, target / photo.name)
    assert sum(1 for _ in root.rglob("*.jpg")) == TOTAL
    return root


@pytest.fixture(scope="module")
def model_dirs(test_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry-models")
    labels = sorted(p.name for p in test_dir.iterdir())
    photos = sorted(test_dir.rglob("*.jpg"))
    dirs = {
        key: constant_model(root / key, labels, key.capitalize()) for key in ("banana", "carrots", "lemon")
    }
    dirs["fitted"] = fitted_model(root / "fitted", labels, photos, [p.parent.name for p in photos])
    dirs["broken"] = constant_model(root / "broken", labels, "Banana")
    return dirs


# The registry tests choose their backends; pytest groups them so each server starts once.
BOTH_BACKENDS = pytest.mark.parametrize("registry", ["sqlite", "postgresql"], indirect=True)
# The gate's logic does not depend on the store: these run once, on SQLite, to keep the file short.
SQLITE = pytest.mark.parametrize("registry", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def registry(request, model_dirs, tmp_path_factory):
    server_dir = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    with running_postgres() if request.param == "postgresql" else _no_database() as backend_uri:
        url, process = start_mlflow_server(server_dir, backend_uri)
        try:
            mlflow.set_tracking_uri(url)
            mlflow.set_experiment("registry-tests")
            yield Registry(url, server_dir, request.param, backend_uri, model_dirs)
        finally:
            mlflow.set_tracking_uri(None)
            stop_mlflow_server(process)
            assert process.poll() is not None


@contextmanager
def _no_database():
    yield None  # start_mlflow_server then uses SQLite under its folder


# -------------------------------------------------------------------------- register


@BOTH_BACKENDS
def test_register_tags_data_metrics_code_and_the_threshold(registry, test_dir, tmp_path):
    run_id = registry.run_id("fitted")
    out = tmp_path / "eval"
    result = evaluate(
        f"models:/{registry.model_ids['fitted']}",
        test_dir,
        out,
        target_accuracy=0.5,
        threshold_data=test_dir,  # the tag plumbing is under test here, not where the threshold came from
        run_id=run_id,
        tracking_uri=registry.url,
        device="cpu",
    )
    threshold = result.metrics["confidence_threshold"]
    assert threshold is not None
    run = registry.client.get_run(run_id)
    assert float(run.data.tags["confidence_threshold"]) == threshold
    assert run.data.metrics["test_top1_accuracy"] == pytest.approx(result.metrics["top1_accuracy"])
    logged = {a.path for a in registry.client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/metrics.json",
        "evaluation/predictions.csv",
        "evaluation/confusion_matrix.png",
    } <= logged

    registered = register(run_id, "tagged", test_metrics=out / "metrics.json", tracking_uri=registry.url)
    tags = registry.tags("tagged", registered.version)
    assert float(tags["confidence_threshold"]) == threshold  # the key serving reads
    assert tags["data_fingerprint"] == "fingerprint-of-fitted"
    assert tags["source_run_id"] == run_id
    assert float(tags["val_top1_error"]) == 0.25 and tags["best_epoch"] == "0"  # the best epoch, not the last
    assert float(tags["test_top1_accuracy"]) == pytest.approx(result.metrics["top1_accuracy"])
    assert tags["test_data_fingerprint"] == result.metrics["test_data_fingerprint"]
    assert tags["code_version"].startswith(shopvision.__version__)
    version = registry.client.get_model_version("tagged", registered.version)
    assert version.run_id == run_id and version.source == f"models:/{registry.model_ids['fitted']}"

    # Without --test-metrics the threshold comes from the run (evaluate --run tagged it).
    again = register(run_id, "tagged", tracking_uri=registry.url)
    assert float(registry.tags("tagged", again.version)["confidence_threshold"]) == threshold
    assert "test_top1_accuracy" not in registry.tags("tagged", again.version)
    # A run never evaluated has no threshold tag at all.
    assert (
        "confidence_threshold"
        not in register(registry.run_id("lemon"), "tagged", tracking_uri=registry.url).tags
    )

    with pytest.raises(StepError, match="not found"):
        register("0" * 32, "tagged", tracking_uri=registry.url)


# ---------------------------------------------------------------------------- promote


ORDERS = {
    "better-then-worse": ["fitted", "lemon"],
    "worse-then-better": ["lemon", "fitted"],
    "equal": ["banana", "carrots"],
    "mixed": ["banana", "lemon", "fitted", "carrots"],
}


@SQLITE
@pytest.mark.parametrize("order", list(ORDERS))
def test_a_worse_or_equal_candidate_is_never_promoted(registry, test_dir, order):
    keys = ORDERS[order]
    name, versions = registry.new_name(*keys)
    champion_key, champion_version, previous_version = None, None, None
    scores: dict[str, float] = {}
    for key, version in zip(keys, versions, strict=True):
        decision = promote(name, version, test_dir, tracking_uri=registry.url, device="cpu", **GATE)
        scores[key] = decision.candidate.top1_accuracy
        if key in EXPECTED:
            assert decision.candidate.top1_accuracy == pytest.approx(EXPECTED[key])
        should = champion_key is None or scores[key] > scores[champion_key]
        assert decision.promoted == should, (order, key, decision.reason)
        if champion_key is not None:
            assert decision.champion.top1_accuracy == pytest.approx(scores[champion_key])
        tags = registry.tags(name, version)
        assert tags["promotion.decision"] == ("promoted" if should else "rejected")
        assert float(tags["promotion.candidate_top1_accuracy"]) == pytest.approx(scores[key])
        assert tags["promotion.champion_version"] == (champion_version or "none")
        if should:
            if champion_version is not None:
                previous_version = champion_version
            champion_key, champion_version = key, version
        assert registry.aliases(name).get(CHAMPION) == champion_version
        assert registry.aliases(name).get(PREVIOUS) == previous_version
    assert scores[champion_key] == max(scores.values())  # the best candidate seen serves


@BOTH_BACKENDS
def test_rollback_restores_the_previous_champion(registry, test_dir, capsys):
    name, (worse, better) = registry.new_name("lemon", "fitted")
    flags = ["--tracking-uri", registry.url]
    for version in (worse, better):
        command = [
            "promote",
            "--name",
            name,
            "--version",
            version,
            "--data",
            str(test_dir),
            "--device",
            "cpu",
        ]
        assert main(command + flags + GATE_FLAGS) == 0
        assert "PROMOTED" in capsys.readouterr().out
    assert registry.aliases(name) == {CHAMPION: better, PREVIOUS: worse}

    assert main(["rollback", "--name", name, *flags, "--lease-settle", "0.1"]) == 0
    assert f"@champion → v{worse} (was v{better})" in capsys.readouterr().out
    assert registry.aliases(name) == {CHAMPION: worse}
    assert "rollback.rolled_back_at" in registry.tags(name, better)
    assert main(["rollback", "--name", name, *flags, "--lease-settle", "0.1"]) == 2
    assert "no @previous version to roll back to" in capsys.readouterr().err
    assert registry.aliases(name) == {CHAMPION: worse}
    with pytest.raises(StepError, match="no registered model named"):
        rollback("no-such-model", tracking_uri=registry.url, lease_settle=0.1)

    # Promoting the champion again is refused; the rolled-back version can be promoted anew.
    with pytest.raises(StepError, match="already @champion"):
        promote(name, worse, test_dir, tracking_uri=registry.url, device="cpu", **GATE)
    assert promote(name, better, test_dir, tracking_uri=registry.url, device="cpu", **GATE).promoted
    assert registry.aliases(name) == {CHAMPION: better, PREVIOUS: worse}
    # ...and the worse one, tried again over the better champion, is not.
    assert not promote(name, worse, test_dir, tracking_uri=registry.url, device="cpu", **GATE).promoted
    assert registry.aliases(name) == {CHAMPION: better, PREVIOUS: worse}


@SQLITE
def test_min_gain_and_floor(registry, test_dir, capsys):
    name, (banana, fitted) = registry.new_name("banana", "fitted")
    promote(name, banana, test_dir, tracking_uri=registry.url, device="cpu", **GATE)
    decision = promote(name, fitted, test_dir, min_gain=0.99, tracking_uri=registry.url, device="cpu", **GATE)
    assert not decision.promoted and "less than the minimum gain" in decision.reason
    assert registry.aliases(name) == {CHAMPION: banana}
    assert registry.tags(name, fitted)["promotion.min_gain"] == "0.99"
    assert promote(
        name, fitted, test_dir, min_gain=0.5, tracking_uri=registry.url, device="cpu", **GATE
    ).promoted

    name, (lemon,) = registry.new_name("lemon")
    command = ["promote", "--name", name, "--version", lemon, "--data", str(test_dir.parent)]  # a split root
    code = main(
        command + ["--min-accuracy", "0.5", "--tracking-uri", registry.url, "--device", "cpu", *GATE_FLAGS]
    )
    assert code == 0  # a rejection is a decision, not an error
    out = capsys.readouterr().out
    assert "REJECTED" in out and "below the floor 0.5000" in out and "no @champion set" in out
    assert registry.aliases(name) == {}


@SQLITE
def test_an_unloadable_champion_is_replaced_only_with_force(registry, test_dir):
    name, (broken, lemon) = registry.new_name("broken", "lemon")
    registry.client.set_registered_model_alias(name, CHAMPION, broken)
    decision = promote(name, lemon, test_dir, tracking_uri=registry.url, device="cpu", **GATE)
    assert not decision.promoted and "cannot be loaded" in decision.reason and "--force" in decision.reason
    assert "cannot read weights" in decision.champion_error
    assert registry.aliases(name) == {CHAMPION: broken}
    assert registry.tags(name, lemon)["promotion.champion_top1_accuracy"] == "unloadable"
    # --force still applies the floor.
    assert not promote(
        name, lemon, test_dir, min_accuracy=0.5, force=True, tracking_uri=registry.url, **GATE
    ).promoted
    decision = promote(name, lemon, test_dir, force=True, tracking_uri=registry.url, device="cpu", **GATE)
    assert decision.promoted and decision.forced
    # The broken version does not become @previous: a rollback must not bring it back.
    assert registry.aliases(name) == {CHAMPION: lemon}
    assert registry.tags(name, lemon)["promotion.forced"] == "true"


@BOTH_BACKENDS
def test_the_registry_lives_in_the_chosen_backend_store(registry):
    """Versions registered and an alias set through the server are rows in the SQLite or PostgreSQL
    database it was started on, not in some default store. The test makes its own model, so it holds
    run alone as in the module."""
    import sqlalchemy

    name, (first, second) = registry.new_name("banana", "carrots")
    registry.client.set_registered_model_alias(name, CHAMPION, second)
    uri = registry.backend_uri or f"sqlite:///{registry.server_dir / 'mlflow.db'}"
    assert uri.startswith("postgresql") == (registry.backend == "postgresql")
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            aliases = connection.execute(
                sqlalchemy.text("SELECT alias, version FROM registered_model_aliases WHERE name = :name"),
                {"name": name},
            ).all()
            versions = connection.execute(
                sqlalchemy.text("SELECT version FROM model_versions WHERE name = :name ORDER BY version"),
                {"name": name},
            ).all()
    finally:
        engine.dispose()
    assert [(alias, str(version)) for alias, version in aliases] == [(CHAMPION, second)]
    assert [str(version) for (version,) in versions] == [first, second]
