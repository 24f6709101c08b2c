"""The pages for people, in a real browser: Debian's headless chromium driven by selenium through
/usr/bin/chromedriver (no browser is downloaded; `make test` installs chromium when it is missing).

- the photo-check page of a real `shopvision serve` process (with `--similar-index`): photos uploaded
  through the page show the top-5 that `/predict` answers, a bad file shows the server's 4xx message,
  and nothing is wider than a 375 px phone screen;
- evaluate's report.html opened from disk: every image loads, every number equals metrics.json;
- audit's report.html: ticking listings downloads a corrections.csv that `clean` applies.

The catalogue is 12 real sample photos (4 categories × 3) plus a Banana photo filed under Kiwi, cleaned.
One small real model embeds it and is served: EfficientNet-Lite0 at 96 px with its ImageNet backbone
(shipped offline) and a classifier layer fitted in seconds to 8 photos per category, so neighbours
look alike, the misfiled Banana is found, and the screenshots show sensible answers. Screenshots go to the test's tmp folder, and to $SHOPVISION_SCREENSHOTS
when set (`SHOPVISION_SCREENSHOTS=docs pytest tests/test_pages.py` refreshes the README's).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from probe_models import imagenet_head_model
from test_serving import serve_process, wait_ready

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (make test installs them)",
)

from shopvision.components.data.clean import clean  # noqa: E402
from shopvision.components.data.corrections import read_corrections  # noqa: E402
from shopvision.components.evaluation.evaluate import evaluate  # noqa: E402
from shopvision.components.similarity.audit import audit  # noqa: E402
from shopvision.components.similarity.features import extract_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "raw"
TAXONOMY = REPO / "data" / "sample" / "taxonomy.csv"
CATEGORIES = ["Banana", "Kiwi", "Lemon", "Pineapple"]
FITTED_PER_CATEGORY = 8
PHONE = (375, 812)
WAIT_S = 30


# --- the browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless chromium for the module, with the flags this closed network needs and a fresh profile."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={folder / 'profile'}",
        f"--window-size={PHONE[0]},{PHONE[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = folder / "downloads"
    driver.downloads.mkdir()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(driver.downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, what: str, seconds: float = WAIT_S):
    """Until the JavaScript expression is truthy; its value."""
    deadline = time.monotonic() + seconds
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def screenshot(driver, name: str, folder: Path, width: int, max_height: int = 1600) -> Path:
    """A PNG of the page at WIDTH (as tall as the page, up to MAX_HEIGHT), in FOLDER and, reduced to a
    small palette, in $SHOPVISION_SCREENSHOTS."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max_height, height + 20))
    time.sleep(0.3)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= width - 20 and image.height > 300
        if os.environ.get("SHOPVISION_SCREENSHOTS"):
            target = Path(os.environ["SHOPVISION_SCREENSHOTS"]) / path.name
            image.convert("RGB").quantize(colors=96).save(target, optimize=True)
    return path


def images_loaded(driver) -> dict:
    return driver.execute_script(
        "const all = Array.from(document.images);"
        "return {count: all.length, broken: all.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)};"
    )


# --- the catalogue, the model and the server ----------------------------------------------------------


def imagenet_model(directory: Path, labels: list[str], photos: list[Path], categories: list[str]) -> Path:
    """EfficientNet-Lite0 at 96 px, ImageNet backbone, classifier fitted to the photos by logistic
    regression on its pooled features (as tiny_models.fitted_model does for a random ResNet)."""
    return imagenet_head_model(
        directory, labels, photos, categories, image_size=96, steps=100, lr=0.05, fit=256
    )


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("pages")
    raw = folder / "raw"
    for category in CATEGORIES:
        (raw / category).mkdir(parents=True)
        for photo in sorted((SAMPLE / category).glob("*.jpg"))[:3]:
            shutil.copyfile(photo, raw / category / photo.name)
    misfiled = sorted((SAMPLE / "Banana").glob("*.jpg"))[6]
    shutil.copyfile(misfiled, raw / "Kiwi" / "misfiled_banana.jpg")
    cleaned = folder / "clean"
    clean(raw, cleaned, size=64, workers=1)
    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    fitted = [p for c in CATEGORIES for p in sorted((SAMPLE / c).glob("*.jpg"))[:FITTED_PER_CATEGORY]]
    served = imagenet_model(folder / "model", labels, fitted, [p.parent.name for p in fitted])
    index = folder / "index"
    extract_features(served, cleaned, index, device="cpu", show_progress=False)
    return {
        "folder": folder,
        "raw": raw,
        "clean": cleaned,
        "index": index,
        "served": served,
        "fitted": fitted,
    }


@pytest.fixture(scope="module")
def server(catalogue):
    log_path = catalogue["folder"] / "serve.log"
    args = ["--device", "cpu", "--model", str(catalogue["served"]), "--similar-index", str(catalogue["index"]),
            "--max-body-mb", "1", "--max-pixels", "1000000"]  # fmt: skip
    with serve_process(*args, log_path=log_path) as (url, process):
        wait_ready(url, process, log_path)
        yield url


# --- the photo-check page -----------------------------------------------------------------------------


def test_index_is_the_page_for_a_browser_and_json_for_everyone_else(server):
    assert requests.get(server, timeout=10).json()["routes"][0] == "/predict"  # curl's */*
    assert "model_name" in requests.get(server, headers={"Accept": "application/json"}, timeout=10).json()
    page = requests.get(server, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10)
    assert page.headers["content-type"].startswith("text/html") and 'id="photos"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing from elsewhere
    assert "http" not in page.text.split("<footer")[0].lower()  # no CDN, no absolute address
    script = requests.get(f"{server}/page/page.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{server}/page/index.py", timeout=10).status_code == 404
    outside = requests.get(f"{server}/similar/photo", params={"path": "../../../etc/passwd"}, timeout=10)
    assert outside.status_code == 404 and "holds no photo" in outside.json()["error"]


def test_photo_check_page_shows_what_predict_answers(browser, server, catalogue, tmp_path):
    photos = [sorted((SAMPLE / c).glob("*.jpg"))[FITTED_PER_CATEGORY + 1] for c in ("Pineapple", "Banana")]
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("not a photo\n")
    browser.set_window_size(*PHONE)
    browser.get(server + "/")
    wait_for(browser, "document.getElementById('model').textContent.startsWith('Model ')", "the model line")
    model_line = browser.find_element("id", "model").text
    assert "version unregistered" in model_line and "Not confident under 0.5 (default)" in model_line
    browser.find_element("id", "photos").send_keys("\n".join(str(p) for p in [*photos, not_a_photo]))
    wait_for(
        browser,
        "document.querySelectorAll('.card').length === 3 && "
        "Array.from(document.querySelectorAll('.card')).every(c => c.dataset.state !== 'checking')",
        "three answered cards",
    )

    for photo in photos:
        card = browser.find_element("css selector", f'.card[data-file="{photo.name}"]')
        assert card.get_attribute("data-state") == "done"
        shown = [
            (li.get_attribute("data-label"), float(li.get_attribute("data-probability")))
            for li in card.find_elements("css selector", "ol.top li")
        ]
        with photo.open("rb") as handle:
            answer = requests.post(
                f"{server}/predict", files={"file": (photo.name, handle)}, timeout=30
            ).json()
        expected = answer["predictions"][0]
        assert [label for label, _ in shown] == [t["label"] for t in expected["top"]]
        assert [p for _, p in shown] == pytest.approx([t["probability"] for t in expected["top"]], abs=1e-5)
        flag = card.find_element("css selector", ".flag")
        assert flag.get_attribute("data-confident") == str(expected["confident"]).lower()
        assert "threshold 0.5" in flag.text

        with photo.open("rb") as handle:
            near = requests.post(
                f"{server}/similar?k=6", files={"file": (photo.name, handle)}, timeout=30
            ).json()
        neighbours = card.find_elements("css selector", ".similar li")
        assert [n.get_attribute("data-category") for n in neighbours] == [
            n["category"] for n in near["neighbours"]
        ]

    bad = browser.find_element("css selector", '.card[data-file="notes.jpg"]')
    assert bad.get_attribute("data-state") == "error"
    assert bad.find_element("css selector", ".error").text.startswith("415: ")
    assert "not a recognised image format" in bad.text

    wait_for(browser, "Array.from(document.images).every(i => i.complete)", "the photos to load")
    loaded = images_loaded(browser)
    assert loaded["count"] == 2 + 2 * 6 and loaded["broken"] == []  # the text file's preview is dropped
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is wider than a {PHONE[0]} px phone: {width}"
    screenshot(browser, "photo-check-page", tmp_path, PHONE[0], max_height=1500)


# --- evaluate's report --------------------------------------------------------------------------------


def metric_at(metrics: dict, keys: list):
    value = metrics
    for key in keys:
        value = value[key]
    return value


@pytest.fixture(scope="module")
def evaluation(catalogue) -> Path:
    """evaluate on a split folder of the sample photos of the four categories the model was not fitted
    on: every other one in test/, the rest in val/ (so few that no threshold is chosen there)."""
    root = catalogue["folder"] / "split"
    fitted = set(catalogue["fitted"])
    for category in CATEGORIES:
        others = [p for p in sorted((SAMPLE / category).glob("*.jpg")) if p not in fitted]
        for n, photo in enumerate(others):
            split = "test" if n % 3 else "val"
            (root / split / category).mkdir(parents=True, exist_ok=True)
            os.link(photo, root / split / category / photo.name)
    out = catalogue["folder"] / "evaluation"
    evaluate(catalogue["served"], root, out, taxonomy=TAXONOMY, device="cpu")
    return out


def test_evaluation_report_shows_its_images_and_the_metrics_of_metrics_json(browser, evaluation, tmp_path):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    html = (evaluation / "report.html").read_text()
    assert 'src="http' not in html and 'href="http' not in html  # one file, nothing fetched
    browser.set_window_size(1100, 900)
    browser.get((evaluation / "report.html").as_uri())
    wait_for(browser, "Array.from(document.images).every(i => i.complete)", "the report's images")
    loaded = images_loaded(browser)
    wrong = sum(1 for row in csv.DictReader((evaluation / "predictions.csv").open()) if row["correct"] == "0")
    assert loaded["broken"] == [] and loaded["count"] >= 1 + min(wrong, 24)  # matrix, then photos

    cells = browser.find_elements("css selector", "[data-metric]")
    checked = set()
    for cell in cells:
        keys = json.loads(cell.get_attribute("data-metric"))
        expected = metric_at(metrics, keys)
        assert json.loads(cell.get_attribute("data-value")) == pytest.approx(expected), keys
        if isinstance(expected, float) and keys[-1] not in ("served_threshold",):
            assert cell.text == f"{expected * 100:.1f}%", keys
        checked.add(tuple(keys[:2]) if keys[0] != "per_category" else ("per_category",))
    assert {
        ("top1_accuracy",), ("top5_accuracy",), ("macro_avg", "f1"), ("macro_category", "accuracy"),
        ("coverage", "served_threshold"), ("coverage", "coverage"), ("per_category",),
        ("macro_category", "per_macro_category"),
    } <= checked  # fmt: skip
    for table in ("headline", "coverage", "per-category", "confusion-counts", "macro-category"):
        assert browser.find_element("id", table).is_displayed()
    provenance = browser.find_element("id", "threshold-source").text
    chosen = metrics["coverage"]["chosen_on"]
    if metrics["confidence_threshold"] is None:
        assert "server default" in provenance and chosen["warning"] in provenance
    else:
        assert f"chosen on {chosen['images']} validation photos" in provenance
    if metrics["top_confusions"]:
        first = metrics["top_confusions"][0]
        row = browser.find_element("css selector", "#confused-pairs tr:nth-child(2)").text
        assert first["true_category"] in row and first["predicted_category"] in row
    screenshot(browser, "evaluation-report", tmp_path, 1000, max_height=1700)


# --- audit's report and the corrections it builds -----------------------------------------------------


@pytest.fixture(scope="module")
def audited(catalogue):
    out = catalogue["folder"] / "audit"
    return audit(catalogue["index"], out, k=3, min_share=0.6, device="cpu", show_progress=False)


def test_audit_report_builds_corrections_that_clean_applies(browser, catalogue, audited, tmp_path):
    result, out = audited, audited.out
    with (out / "mislabelled.csv").open() as handle:
        listed = {row["path"]: row for row in csv.DictReader(handle)}
    assert listed["Kiwi/misfiled_banana.jpg"]["suggested_category"] == "Banana", listed
    browser.set_window_size(1000, 900)
    browser.get((out / "report.html").as_uri())
    wait_for(browser, "Array.from(document.images).every(i => i.complete)", "the audit's thumbnails")
    loaded = images_loaded(browser)
    assert loaded["broken"] == [] and loaded["count"] >= 4 * len(result.mislabelled)  # photo, 3 nearest
    assert browser.find_element("id", "download").get_attribute("disabled") is not None  # nothing ticked yet
    rows = browser.find_elements("css selector", "#mislabelled tr[data-photo]")
    assert [r.get_attribute("data-photo") for r in rows] == list(listed)
    misfiled = next(r for r in rows if r.get_attribute("data-photo") == "Kiwi/misfiled_banana.jpg")
    misfiled.find_element("css selector", "input.fix").click()
    assert browser.find_element("id", "ticked").text == "1 listing ticked"
    browser.find_element("id", "download").click()
    downloaded = browser.downloads / "corrections.csv"
    deadline = time.monotonic() + WAIT_S
    while not downloaded.is_file():
        assert time.monotonic() < deadline, f"no download: {list(browser.downloads.iterdir())}"
        time.sleep(0.1)
    text = downloaded.read_text()
    assert text == "photo,category,corrected_category\nKiwi/misfiled_banana.jpg,Kiwi,Banana\n"
    assert text == browser.find_element("id", "corrections-text").get_attribute("value")
    screenshot(browser, "audit-report", tmp_path, 1000, max_height=1000)

    corrected = clean(
        catalogue["raw"], tmp_path / "clean", size=64, workers=1, corrections=read_corrections(downloaded)
    )
    assert [(m["previous_output"], m["output"]) for m in corrected.corrections] == [
        ("Kiwi/misfiled_banana.jpg", "Banana/misfiled_banana.jpg")
    ]
    assert (tmp_path / "clean" / "Banana" / "misfiled_banana.jpg").is_file()
    assert not (tmp_path / "clean" / "Kiwi" / "misfiled_banana.jpg").exists()


def test_both_reports_are_logged_to_the_mlflow_run(catalogue, evaluation, audited, tmp_path):
    """evaluate --run logs report.html with the rest of its folder; the audit's is logged beside it."""
    from mlflow import MlflowClient

    from shopvision.components.similarity.audit_report import log_audit_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("pages")).info.run_id
    out = tmp_path / "evaluation"
    evaluate(
        catalogue["served"], evaluation.parent / "split", out, run_id=run_id, tracking_uri=uri, device="cpu"
    )
    log_audit_report(run_id, audited.out, tracking_uri=uri)
    logged = {a.path for folder in ("evaluation", "audit") for a in client.list_artifacts(run_id, folder)}
    assert {
        "evaluation/report.html",
        "evaluation/metrics.json",
        "audit/report.html",
        "audit/mislabelled.csv",
    } <= logged
    copy = client.download_artifacts(run_id, "evaluation/report.html", str(tmp_path / "copy"))
    assert Path(copy).read_bytes() == (out / "report.html").read_bytes()
