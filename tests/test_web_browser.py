"""The web page in a real headless Chromium against the real server: upload, result, CAM, refusal, offline."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermlens import DISCLAIMER
from dermlens.data.taxonomy import FINE_NAMES, SITES

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def photos() -> list[tuple[str, np.ndarray]]:
    """Everyday photographs that are not dermoscopy: scikit-image samples, else a synthetic scene."""
    try:
        from skimage import data
    except ImportError:
        yy, xx = np.mgrid[0:450, 0:600]
        scene = np.stack([(xx * 255 // 600), (yy * 255 // 450), ((xx + yy) % 64) * 4], -1).astype(np.uint8)
        return [("synthetic.png", scene)]
    return [
        (f"{name}.png", np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB")))
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(predictor, tmp_path_factory: pytest.TempPathFactory):
    from _server import BackgroundServer
    from dermlens.serve.api import create_app
    from dermlens.serve.settings import load_settings

    db = tmp_path_factory.mktemp("web") / "records.db"
    settings = load_settings(records={"url": f"sqlite:///{db}"})
    with BackgroundServer(create_app(settings, predictor=predictor)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def accepted_lesion(predictor, ham_root: Path) -> Path:
    """A HAM10000 image the model accepts (not OOD), so the page shows a full result."""
    for path in sorted((ham_root / "images").glob("*.jpg"))[:40]:
        r = predictor.predict_file(path, {"age": 55, "sex": "female", "site": "lower extremity"})
        if not r.ood and not r.not_dermoscopy:
            return path
    pytest.fail("the model refuses the first 40 HAM10000 images as OOD")


def referred_lesion(predictor, ham_root: Path) -> Path | None:
    """A HAM10000 image the model accepts but refers (low confidence), if any of the first 60 is."""
    for path in sorted((ham_root / "images").glob("*.jpg"))[:60]:
        r = predictor.predict_file(path)
        if r.refer and not r.ood and not r.not_dermoscopy:
            return path
    return None


def refused_photo(predictor) -> tuple[str, bytes]:
    """A non-dermoscopy photo the model flags as OOD."""
    for name, rgb in photos():
        data = png_bytes(rgb)
        if predictor.predict_bytes(data).ood:
            return name, data
    pytest.fail("the OOD detector accepted every non-dermoscopy sample photo")


def drop_file(page, selector: str, name: str, data: bytes, mime: str) -> None:
    """Drag-and-drop a file onto an element, as a user dropping it from the desktop."""
    dt = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bin = atob(b64); const buf = new Uint8Array(bin.length);
            for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
            const dt = new DataTransfer(); dt.items.add(new File([buf], name, { type: mime })); return dt;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": dt})
    page.dispatch_event(selector, "drop", {"dataTransfer": dt})


def test_web_page_upload_result_cam_and_refusal(server, browser, predictor, ham_root, tmp_path):
    lesion = accepted_lesion(predictor, ham_root)
    photo_name, photo = refused_photo(predictor)
    external, problems = [], []
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    # Offline guarantee: every request must go to this server; anything else is recorded and blocked.
    context.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(server.url)
            else (external.append(route.request.url), route.abort())
        ),
    )
    page = context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    from playwright.sync_api import expect

    page.goto(server.url + "/")
    expect(page.locator("#model-tag")).to_contain_text(f"v{predictor.card.version}")
    assert page.is_visible("#disclaimer")
    assert DISCLAIMER in page.inner_text("#disclaimer")
    assert page.locator("#site option").all_inner_texts() == ["not given", *SITES]

    # 1. A real lesion, chosen with the file picker, with metadata.
    page.fill("#age", "55")
    page.select_option("#sex", "female")
    page.select_option("#site", "lower extremity")
    page.set_input_files("#file-input", str(lesion))
    page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
    assert page.locator("#bars-fine .bar").count() == len(predictor.classes)
    assert page.locator("#bars-coarse .bar").count() == 2
    labels = page.locator("#bars-fine .bar-label").all_inner_texts()
    for code in predictor.classes:
        assert any(label.startswith(FINE_NAMES[code]) for label in labels), code
    top = page.inner_text("#top-class")
    assert top in FINE_NAMES.values()
    assert page.inner_text("#confidence").endswith("%")
    assert page.is_hidden("#ood-warning")
    assert page.is_visible("#disclaimer")
    direct = predictor.predict_file(lesion, {"age": 55, "sex": "female", "site": "lower extremity"})
    refer = direct.refer
    assert page.is_visible("#refer-warning") == refer
    if refer:
        assert "Refer to a dermatologist" in page.inner_text("#refer-warning")
        codes = page.locator("#refer-list li").evaluate_all("els => els.map(e => e.dataset.code)")
        assert codes == direct.refer_codes
    if direct.prediction_set is not None:  # the conformal set, in plain words
        assert page.is_visible("#pset") and FINE_NAMES[direct.prediction_set[0]] in page.inner_text("#pset")
        assert "prediction set" in page.inner_text("#pset-title").lower()  # CSS may upper-case it

    # CAM overlay toggle.
    assert page.is_enabled("#cam-toggle")
    page.check("#cam-toggle")
    page.wait_for_selector("#cam-overlay:not(.hidden)")
    assert page.evaluate("document.getElementById('cam-overlay').naturalWidth") > 0
    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)

    # 2. A non-dermoscopy photo, dropped on the page: refused, no classification shown.
    drop_file(page, "#drop-zone", photo_name, photo, "image/png")
    page.wait_for_selector("#ood-warning:not(.hidden)", timeout=60_000)
    assert "Image refused" in page.inner_text("#ood-warning")
    assert page.is_hidden("#scores")
    assert page.is_visible("#disclaimer")
    page.screenshot(path=str(tmp_path / "web_refused.png"), full_page=True)

    # 3. A referred lesion (if the model refers any of the first HAM images): the referral banner.
    referred = referred_lesion(predictor, ham_root)
    if referred is not None:
        page.select_option("#site", "")
        page.fill("#age", "")
        page.select_option("#sex", "")
        page.set_input_files("#file-input", str(referred))
        page.wait_for_selector("#refer-warning:not(.hidden)", timeout=60_000)
        assert "Refer to a dermatologist" in page.inner_text("#refer-warning")
        assert page.is_visible("#scores") and page.is_hidden("#ood-warning")
        page.screenshot(path=str(tmp_path / "web_referred.png"), full_page=True)

    # 4. A file that is not an image: a readable error, and the page keeps working.
    page.set_input_files(
        "#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}]
    )
    page.wait_for_selector("#error:not(.hidden)")
    assert "not a supported image format" in page.inner_text("#error")
    page.set_input_files("#file-input", str(lesion))
    page.wait_for_selector("#result:not(.hidden)", timeout=60_000)
    assert page.is_hidden("#error")

    context.close()
    assert not external, f"the page tried to load external resources: {external}"
    problems = [p for p in problems if "400 (Bad Request)" not in p]  # the deliberate bad upload
    assert not problems, problems
    if os.environ.get("DERMLENS_UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOTS / "web.png")
        shutil.copy(tmp_path / "web_refused.png", SCREENSHOTS / "web_refused.png")
        if referred is not None:
            shutil.copy(tmp_path / "web_referred.png", SCREENSHOTS / "web_referred.png")
