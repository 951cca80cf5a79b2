"""The bundle's ONNX contract: (image, meta) -> (fine_logits, coarse_logits, embedding, feature_map), traced
from a DermNet with TF-'SAME' convs rewritten so the int8 quantizer accepts them; and the PyTorch reference
outputs for the parity check."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dermlens import DISCLAIMER, __version__
from dermlens.infer.session import OUTPUTS
from dermlens.metadata import META_DIM
from dermlens.model.network import DermNet
from dermlens.preprocess import Preprocessing

INPUTS: tuple[str, ...] = ("image", "meta")


class SamePadConv(nn.Module):
    """TensorFlow 'SAME' strided conv whose padding is traced without Clip (valid when (k-1)*d+1 >= stride).

    timm's Conv2dSame computes max(pad, 0) with a Clip that shares a constant with the ReLU6 Clips after
    constant folding, which breaks onnxruntime's QOperator quantizer; here pad = (k-1)*d+1-s+(s - x%s)%s.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation, strict=True):
            if (k - 1) * d + 1 < s:
                raise ValueError(f"SamePadConv needs (k-1)*d+1 >= stride, got k={k} s={s} d={d}")

    def _pad(self, size: Any, axis: int) -> tuple[Any, Any]:
        k, s, d = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.dilation[axis]
        total = (k - 1) * d + 1 - s + (s - size % s) % s
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        x = F.pad(x, (left, right, top, bottom))
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _swap_same_convs(module: nn.Module) -> int:
    """Replace timm Conv2dSame children by SamePadConv in place; returns how many."""
    from timm.layers.conv2d_same import Conv2dSame

    n = 0
    for name, child in module.named_children():
        if isinstance(child, Conv2dSame):
            setattr(module, name, SamePadConv(child))
            n += 1
        else:
            n += _swap_same_convs(child)
    return n


class OnnxGraph(nn.Module):
    """(image, meta) -> (fine_logits, coarse_logits, embedding, feature_map): the bundle's ONNX contract."""

    def __init__(self, net: DermNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).float().eval()
        _swap_same_convs(self.net)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net.forward_all(image, meta if self.net.uses_metadata else None)


def export_onnx(net: DermNet, path: str | Path, prep: Preprocessing, opset: int = 17) -> Path:
    """Write the fp32 ONNX graph: dynamic batch, height and width; inputs image + meta."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = OnnxGraph(net).eval()
    x = torch.zeros(2, 3, prep.height, prep.width)
    meta = torch.zeros(2, META_DIM)
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "meta": {0: "batch"}}
    axes |= {o: {0: "batch"} for o in OUTPUTS[:3]} | {"feature_map": {0: "batch", 2: "fh", 3: "fw"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen deliberately
        torch.onnx.export(
            graph,
            (x, meta),
            str(path),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    if "meta" not in {
        i.name for i in model.graph.input
    }:  # unused by a model without metadata: keep the contract
        model.graph.input.append(
            onnx.helper.make_tensor_value_info("meta", onnx.TensorProto.FLOAT, ["batch", META_DIM])
        )
    model.doc_string = f"dermlens {__version__}: {DISCLAIMER}"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@torch.no_grad()
def torch_outputs(
    net: DermNet, images: np.ndarray, meta: np.ndarray, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """PyTorch eager fp32 outputs for uint8 NxHxWx3 images (the parity reference)."""
    x = torch.from_numpy(prep.normalize(images))
    m = torch.from_numpy(meta) if net.uses_metadata else None
    fine, coarse, emb, fmap = net.float().eval().forward_all(x, m)
    return {
        "fine_logits": fine.numpy(),
        "coarse_logits": coarse.numpy(),
        "embedding": emb.numpy(),
        "feature_map": fmap.numpy(),
    }
