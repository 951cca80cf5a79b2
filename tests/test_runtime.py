"""The torch-free Predictor on the packaged bundle, with real HAM10000 / ISIC 2017 images in every format."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundles import bundle_dir  # tests/bundles.py
from dermlens.bundle import BundleError
from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.preprocess import ImageDecodeError, load_rgb


@pytest.fixture(scope="module")
def ham_images(ham_root: Path) -> list[Path]:
    return sorted((ham_root / "images").glob("*.jpg"))[:12]


@pytest.fixture(scope="module")
def reference(ham_images: list[Path]) -> np.ndarray:
    return load_rgb(ham_images[0])


def test_load_defaults_and_errors(tmp_path: Path) -> None:
    from dermlens.infer.predictor import Predictor
    from dermlens.infer.session import default_precision

    p = Predictor.load(bundle_dir(), threads=1)
    assert p.classes == HAM_CLASSES == tuple(p.card.classes)
    assert p.precision == default_precision(p.card.extra.get("default_precision"))  # int8, fp32 w/o VNNI
    with pytest.raises(BundleError, match=str(tmp_path)):
        Predictor.load(tmp_path)
    with pytest.raises(ValueError, match="precision"):
        Predictor.load(bundle_dir(), precision="fp16")


def test_predict_arrays_contract(predictor, ham_images: list[Path]) -> None:
    imgs = [load_rgb(p) for p in ham_images[:6]]
    r = predictor.predict_arrays(imgs)
    n, c = len(imgs), len(HAM_CLASSES)
    assert r["probs"].shape == r["probs_uncalibrated"].shape == (n, c)
    assert r["coarse_probs"].shape == (n, 2)
    np.testing.assert_allclose(r["probs"].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(r["coarse_probs"].sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(r["top"], r["probs"].argmax(1))
    np.testing.assert_allclose(r["confidence"], r["probs"].max(1))
    np.testing.assert_allclose(r["malignant"], r["coarse_probs"][:, 1])
    state = predictor.trust
    np.testing.assert_array_equal(r["ood"], r["ood_score"] > state.ood_threshold)
    np.testing.assert_array_equal(r["refer"], r["ood"] | (r["confidence"] < state.min_confidence))
    # temperature scaling keeps the ranking of classes
    np.testing.assert_array_equal(r["probs"].argmax(1), r["probs_uncalibrated"].argmax(1))
    assert r["embedding"].shape[0] == n and r["embedding"].ndim == 2
    assert "cam" not in r
    # one image at a time gives the same answer as a batch
    single = predictor.predict_arrays(imgs[:1])
    np.testing.assert_allclose(single["probs"][0], r["probs"][0], atol=1e-5)


def test_any_size_uses_shared_preprocessing(predictor, data_root: Path) -> None:
    """A 256x256 ISIC 2017 image is resized by card.preprocessing exactly like the training cache."""
    path = sorted((data_root / "isic2017" / "images").glob("*.jpg"))[0]
    rgb = load_rgb(path)
    assert rgb.shape[:2] != (predictor.prep.height, predictor.prep.width)
    a = predictor.predict_arrays([rgb])
    b = predictor.predict_arrays([predictor.card.preprocessing.geometry.resize(rgb)])
    np.testing.assert_array_equal(a["probs"], b["probs"])
    big = np.asarray(Image.fromarray(rgb).resize((1024, 768)))
    assert predictor.predict_arrays([big])["probs"].shape == (1, len(HAM_CLASSES))


def _encode(rgb: np.ndarray, fmt: str, mode: str) -> bytes:
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    elif mode == "RGBA":
        a = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        a[:10, :10] = 0  # a transparent corner composited over white
        img = Image.fromarray(np.concatenate([rgb, a], axis=2), "RGBA")
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


CASES = [
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "L"),
    ("PNG", "P"),
    ("PNG", "I;16"),
    ("BMP", "RGB"),
    ("BMP", "L"),
    ("BMP", "P"),
    ("TIFF", "RGB"),
    ("TIFF", "RGBA"),
    ("TIFF", "L"),
    ("TIFF", "P"),
    ("TIFF", "CMYK"),
    ("TIFF", "I;16"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
]


@pytest.mark.parametrize(("fmt", "mode"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_formats_and_modes(predictor, reference: np.ndarray, tmp_path: Path, fmt: str, mode: str) -> None:
    path = tmp_path / f"lesion.{fmt.lower()}"
    path.write_bytes(_encode(reference, fmt, mode))
    assert Image.open(path).mode == mode or fmt == "WEBP"
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == reference.shape
    if mode in ("L", "I;16"):
        assert (rgb[..., 0] == rgb[..., 1]).all()
    if fmt in ("PNG", "BMP", "TIFF") and mode in ("RGB", "CMYK"):
        np.testing.assert_array_equal(rgb, reference)
    res = predictor.predict_file(path)
    assert res.top_class in HAM_CLASSES and abs(sum(res.fine.values()) - 1) < 1e-5


def test_sixteen_bit_rgb_png(predictor, reference: np.ndarray, tmp_path: Path) -> None:
    """48-bit RGB PNG (Pillow reads it, cannot write it): written by hand with zlib."""
    import struct
    import zlib

    h, w, _ = reference.shape
    rows = b"".join(b"\x00" + (reference[y].astype(">u2") * 257).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    np.testing.assert_array_equal(load_rgb(png), reference)
    assert predictor.predict_bytes(png).top_class in HAM_CLASSES


def test_exif_orientation_applied(predictor, reference: np.ndarray, tmp_path: Path) -> None:
    """A JPEG stored sideways with EXIF orientation 6 decodes upright and predicts like the original."""
    stored = Image.fromarray(reference).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "camera.jpg"
    stored.save(path, quality=100, exif=exif.tobytes())
    upright = load_rgb(path)
    assert upright.shape == reference.shape
    assert np.abs(upright.astype(int) - reference.astype(int)).mean() < 2.0
    a = predictor.predict_file(path)
    b = predictor.predict_arrays([reference])
    assert abs(a.confidence - float(b["confidence"][0])) < 0.05


def test_predict_bytes_result_and_cam(predictor, ham_images: list[Path]) -> None:
    data = ham_images[1].read_bytes()
    res = predictor.predict_bytes(data, {"age": 55, "sex": "male", "site": "back"}, cam=True)
    assert set(res.fine) == set(HAM_CLASSES) and set(res.coarse) == {"benign", "malignant"}
    assert res.top_class == max(res.fine, key=res.fine.get)
    assert res.confidence == pytest.approx(res.fine[res.top_class])
    assert res.p_malignant == pytest.approx(res.coarse["malignant"])
    assert res.model_version == predictor.card.version and res.precision == predictor.precision
    assert res.refer == (res.refer_reason is not None)
    assert {"decode", "model", "cam", "total"} <= set(res.timing_ms)
    png = Image.open(io.BytesIO(res.cam_png))
    assert png.format == "PNG" and png.size == (res.image_width, res.image_height)
    d = res.model_dump()
    assert "cam_png" not in d and d["top_class"] == res.top_class
    r = predictor.predict_arrays([load_rgb(data)], cam=True)
    heat = r["cam"][0]
    assert heat.ndim == 2 and heat.min() >= 0 and heat.max() <= 1


def test_tta_and_metadata(predictor, ham_images: list[Path]) -> None:
    imgs = [load_rgb(p) for p in ham_images[2:5]]
    plain = predictor.predict_arrays(imgs, tta=False)
    tta = predictor.predict_arrays(imgs, tta=True)
    np.testing.assert_allclose(tta["probs"].sum(1), 1, atol=1e-6)
    assert not np.allclose(tta["probs"], plain["probs"])
    np.testing.assert_array_equal(tta["ood_score"], plain["ood_score"])  # OOD uses the identity view
    old = [{"age": 80, "sex": "male", "site": "face"}] * 3
    young = [{"age": 20, "sex": "female", "site": "lower extremity"}] * 3
    a, b = predictor.predict_arrays(imgs, old), predictor.predict_arrays(imgs, young)
    assert np.allclose(a["probs"], b["probs"]) != predictor.card.uses_metadata


def test_unreadable_input(predictor, ham_images: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="upload"):
        predictor.predict_bytes(b"definitely not an image")
    data = ham_images[0].read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        predictor.predict_file(bad)


def test_fp32_and_int8_agree(ham_images: list[Path]) -> None:
    from dermlens.infer.predictor import Predictor
    from dermlens.infer.session import int8_exact

    if not int8_exact():
        pytest.skip("x86 CPU without VNNI: int8 saturates here, so the runtime serves fp32")

    imgs = [load_rgb(p) for p in ham_images]
    p32 = Predictor.load(bundle_dir(), precision="fp32", threads=1).predict_arrays(imgs)
    p8 = Predictor.load(bundle_dir(), precision="int8", threads=1).predict_arrays(imgs)
    assert np.abs(p32["probs"] - p8["probs"]).max() < 0.25
    assert (p32["top"] == p8["top"]).mean() >= 0.75


def test_concurrent_predictions(predictor, ham_images: list[Path]) -> None:
    """The API runs predictions from several threads at once: results must not mix."""
    imgs = [load_rgb(p) for p in ham_images[:4]]
    expected = [predictor.predict_arrays([im])["probs"][0] for im in imgs]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = predictor.predict_arrays([imgs[i]])["probs"][0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        np.testing.assert_allclose(got[i], e, atol=1e-6)
