"""Training augmentation on a real HAM10000 image and its lesion mask: each op does what its name says,
seeded runs repeat, and the shipped recipe (every new op off) is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dermlens import config
from dermlens.preprocess import Preprocessing, load_rgb
from dermlens.train.augment import geometry_ops, photometric_ops, train_transform
from dermlens.train.transforms import (
    RandomDownUp,
    RandomJpeg,
    RandomRotate90,
    RandomVignette,
    RandomZoom,
    RemoveField,
    field_circle,
)

IMAGE = "ISIC_0024306"
PREP = Preprocessing.default()  # 150x200, the size of the training cache


@pytest.fixture(scope="module")
def pair(ham_root) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """The image at the model size (as the cache holds it) and its lesion mask, as v2 tensors."""
    rgb = PREP.resize(load_rgb(ham_root / "images" / f"{IMAGE}.jpg"))
    mask = Image.open(ham_root / "masks" / f"{IMAGE}_segmentation.png").convert("L")
    mask = np.asarray(mask.resize((PREP.width, PREP.height), Image.Resampling.NEAREST)) > 127
    image = tv_tensors.Image(torch.from_numpy(rgb.transpose(2, 0, 1).copy()))
    return image, tv_tensors.Mask(torch.from_numpy(mask)[None])


def augment(**over) -> dict:
    """configs/train.yaml `augment:` with overrides."""
    return {**config.load("train")["augment"], **over}


def find(ops: list, cls: type) -> v2.Transform:
    """The op of type `cls` in a list of ops, unwrapped from RandomApply (so it always applies)."""
    for op in ops:
        inner = op.transforms[0] if isinstance(op, v2.RandomApply) else op
        if isinstance(inner, cls):
            return inner
    raise AssertionError(f"no {cls.__name__} among {ops}")


def luminance_energy(x: torch.Tensor) -> float:
    """Mean absolute horizontal + vertical gradient: high-frequency content."""
    g = x.float().mean(dim=0)
    return float((g[:, 1:] - g[:, :-1]).abs().mean() + (g[1:] - g[:-1]).abs().mean())


def test_flips_mirror_pixels_exactly(pair):
    image, _ = pair
    torch.manual_seed(0)
    for cls, dim in ((v2.RandomHorizontalFlip, -1), (v2.RandomVerticalFlip, -2)):
        op = find(geometry_ops(PREP, augment()), cls)
        outs = [op(image) for _ in range(12)]
        flipped = [torch.equal(o, image.flip(dim)) for o in outs]
        assert all(f or torch.equal(o, image) for f, o in zip(flipped, outs, strict=True))
        assert 0 < sum(flipped) < 12  # p = 0.5: both outcomes occur


def test_rotation_keeps_lesion_area_and_blacks_corners(pair):
    image, mask = pair
    op = find(geometry_ops(PREP, augment()), v2.RandomRotation)
    assert op.interpolation == v2.InterpolationMode.BILINEAR and list(op.degrees) == [-30.0, 30.0]
    torch.manual_seed(1)
    for _ in range(5):
        out, m = op(image, mask)
        assert out.shape == image.shape and m.shape == mask.shape
        assert 0.9 < float(m.sum()) / float(mask.sum()) < 1.1
        assert not torch.equal(out, image)
    assert int(out[:, 0, 0].sum()) == 0 or int(out[:, -1, -1].sum()) == 0  # corners filled black


def test_rotate90_on_square_inputs(pair):
    image, mask = pair
    square = Preprocessing(128, 128, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert isinstance(find(geometry_ops(square, augment()), RandomRotate90), RandomRotate90)
    img, msk = v2.functional.center_crop(image, [128, 128]), v2.functional.center_crop(mask, [128, 128])
    torch.manual_seed(2)
    for _ in range(4):
        out, m = RandomRotate90()(img, msk)
        turns = [k for k in range(4) if torch.equal(out, torch.rot90(img, k, dims=(-2, -1)))]
        assert len(turns) == 1 and torch.equal(m, torch.rot90(msk, turns[0], dims=(-2, -1)))


def test_random_resized_crop_gives_the_model_size(pair):
    image, mask = pair
    op = find(geometry_ops(PREP, augment(scale=[0.4, 1.0])), v2.RandomResizedCrop)
    assert tuple(op.scale) == (0.4, 1.0) and tuple(op.size) == (PREP.height, PREP.width)
    torch.manual_seed(3)
    areas = []
    for _ in range(6):
        out, m = op(image, mask)
        assert out.shape == (3, PREP.height, PREP.width) and out.dtype == torch.uint8
        areas.append(float(m.sum()) / float(mask.sum()))
    assert max(areas) > 1.05  # a crop of part of the field, shown at full size, enlarges the lesion


def test_colour_jitter_moves_mean_colour_within_bounds(pair):
    image, mask = pair
    op = find(photometric_ops(augment(color_jitter=0.2)), v2.ColorJitter)
    assert tuple(op.brightness) == (0.8, 1.2) and tuple(op.hue) == (-0.05, 0.05)
    torch.manual_seed(4)
    base = image.float().mean(dim=(1, 2))
    shifts = []
    for _ in range(8):
        out = op(image)
        assert out.shape == image.shape
        shifts.append(float(((out.float().mean(dim=(1, 2)) - base).abs() / base).max()))
    assert max(shifts) > 0.02 and max(shifts) < 0.6


def test_blur_and_down_up_sampling_remove_detail(pair):
    image, _ = pair
    torch.manual_seed(5)
    blur = find(photometric_ops(augment(blur=1.0)), v2.RandomChoice)
    assert luminance_energy(blur(image)) < 0.95 * luminance_energy(image)
    down = find(photometric_ops(augment(downsample=1.0, downsample_min=40)), RandomDownUp)
    outs = [down(image) for _ in range(6)]
    assert all(o.shape == image.shape for o in outs)
    assert min(luminance_energy(o) for o in outs) < 0.8 * luminance_energy(image)
    assert torch.equal(RandomDownUp(min_side=10_000)(image), image)  # full size: nothing to lose


def test_jpeg_recompression_costs_quality_by_its_setting(pair):
    image, _ = pair

    def psnr(q: int) -> float:
        out = find(photometric_ops(augment(jpeg=1.0, jpeg_quality=[q, q])), RandomJpeg)(image)
        mse = float(((out.float() - image.float()) ** 2).mean())
        return 10 * np.log10(255.0**2 / mse)

    low, high = psnr(30), psnr(95)
    assert 22 < low < high - 5 < 60


def test_coarse_dropout_erases_one_to_four_small_patches(pair):
    image, _ = pair
    op = find(photometric_ops(augment(coarse_dropout=1.0)), v2.RandomChoice)
    torch.manual_seed(6)
    for _ in range(6):
        out = op(image)
        erased = float(((out == 0).all(dim=0) & (image != 0).any(dim=0)).float().mean())
        assert 0.002 < erased < 4 * 0.0225 + 0.01


def test_vignette_blacks_the_corners_and_keeps_the_centre(pair):
    image, mask = pair
    op = find(photometric_ops(augment(vignette=1.0, vignette_radius=[0.6, 0.6])), RandomVignette)
    out, m = op(image, mask)
    assert torch.equal(m, mask)
    h, w = PREP.height, PREP.width
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        assert int(out[:, y, x].sum()) == 0
    c = (slice(None), slice(h // 2 - 20, h // 2 + 20), slice(w // 2 - 20, w // 2 + 20))
    assert torch.equal(out[c], image[c])
    assert field_circle(out) is not None and field_circle(image) is None


def test_remove_field_crops_the_inscribed_rectangle(pair):
    image, mask = pair
    ringed = RandomVignette(radius=(0.6, 0.6))(image)
    op = find(geometry_ops(PREP, augment(unvignette=1.0)), RemoveField)
    out, m = op(ringed, mask)
    assert out.shape == image.shape
    assert field_circle(out) is None  # no dark border left
    assert float(m.sum()) > float(mask.sum())  # the lesion now fills more of the frame
    same, same_mask = op(image, mask)  # no border: unchanged
    assert torch.equal(same, image) and torch.equal(same_mask, mask)
    blotched = image.clone()
    blotched[:, 50:100, 70:130] = 0  # a dark lesion, 10% of the image, with bright corners: no field
    assert torch.equal(op(blotched), blotched)


def test_zoom_in_enlarges_a_window(pair):
    image, mask = pair
    op = find(geometry_ops(PREP, augment(zoom=1.0, zoom_range=[1.4, 1.4])), RandomZoom)
    torch.manual_seed(7)
    params = op.make_params([image, mask])
    top, left, h, w = params["crop"]
    assert (h, w) == (round(PREP.height / 1.4), round(PREP.width / 1.4))
    out, m = op.transform(image, params), op.transform(mask, params)
    assert out.shape == image.shape
    inside = float(mask[:, top : top + h, left : left + w].sum())
    assert abs(float(m.sum()) / inside / 1.4**2 - 1) < 0.05


def test_zoom_out_shrinks_and_pads_by_reflection(pair):
    image, mask = pair
    op = find(geometry_ops(PREP, augment(zoom=1.0, zoom_range=[0.7, 0.7])), RandomZoom)
    torch.manual_seed(7)
    params = op.make_params([image, mask])
    left, top, _, _ = params["pad"]
    sh, sw = params["shrink"]
    out, m = op.transform(image, params), op.transform(mask, params)
    assert out.shape == image.shape and m.shape == mask.shape
    window = m[:, top : top + sh, left : left + sw]
    assert abs(float(window.sum()) / float(mask.sum()) / 0.7**2 - 1) < 0.05
    if left > 1:  # the border mirrors the shrunk image (the edge column not repeated)
        assert torch.equal(out[:, top : top + sh, left - 1], out[:, top : top + sh, left + 1])
    assert int((out.float().mean(dim=0) < 5).sum()) == 0  # no black border


def test_zoom_range_below_half_is_refused():
    with pytest.raises(ValueError, match="zoom range"):
        RandomZoom((0.3, 1.0))


def test_seeded_pipeline_repeats_and_keeps_size(pair):
    image, _ = pair
    tf = train_transform(PREP, augment(blur=0.5, coarse_dropout=0.5, downsample=0.5, jpeg=0.5, zoom=0.5))
    torch.manual_seed(8)
    first = [tf(image) for _ in range(3)]
    torch.manual_seed(8)
    again = [tf(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(a.shape == (3, PREP.height, PREP.width) and a.dtype == torch.uint8 for a in first)


def test_shipped_recipe_has_no_robustness_ops():
    ops = train_transform(PREP, augment()).transforms
    inner = [op.transforms[0] if isinstance(op, v2.RandomApply) else op for op in ops]
    new = (RandomDownUp, RandomVignette, RemoveField, RandomZoom, RandomJpeg)
    assert not any(isinstance(op, new) for op in inner)


def test_training_batches_with_every_op_on(tiny_dir):
    from dermlens.train.config import load_config
    from dermlens.train.datamodule import DermDataModule

    ops = ["downsample", "jpeg", "vignette", "unvignette", "zoom", "blur", "coarse_dropout"]
    cfg = load_config(
        None,
        [f"data.dir={tiny_dir}", "preprocess.height=64", "preprocess.width=80", "data.batch_size=8"]
        + [f"augment.{op}=1.0" for op in ops],
    )
    torch.manual_seed(9)
    image, meta, fine, _ = next(iter(DermDataModule(cfg).train_dataloader()))
    assert image.shape == (8, 3, 64, 80) and image.dtype == torch.uint8 and len(fine) == len(meta) == 8


def test_bad_augment_setting_is_a_one_line_error(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    args = [f"data.dir={tiny_dir}", f"trainer.run_dir={tmp_path}", "preprocess.height=64"]
    args += ["preprocess.width=80"]
    r = CliRunner().invoke(app, ["train", *args, "augment.zoom=0.5", "augment.zoom_range=[0.3, 1.0]"])
    assert r.exit_code == 2 and "augment: zoom range" in r.output and "Traceback" not in r.output
