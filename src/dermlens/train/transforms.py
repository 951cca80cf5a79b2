"""Training transforms torchvision.transforms.v2 lacks: 90-degree turns, down-and-up sampling, JPEG
re-compression (Pillow: torchvision's own JPEG codec is deprecated), the dermoscope field (a circular
vignette added, or a dark field cropped away) and zoom with reflection padding.

Each works on uint8 CxHxW tensors (tv_tensors.Image or a plain tensor); geometric ones move a
tv_tensors.Mask along, photometric ones leave it as it is.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode, Transform
from torchvision.transforms.v2 import functional as F


def _size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(height, width) of the first image-like input."""
    first = next(i for i in flat_inputs if isinstance(i, torch.Tensor))
    return tuple(F.get_size(first))  # type: ignore[return-value]


def _first_image(flat_inputs: list[Any]) -> torch.Tensor:
    """The image among the inputs (a tv_tensors.Image, else the first plain tensor)."""
    images = [i for i in flat_inputs if isinstance(i, tv_tensors.Image)]
    return images[0] if images else next(i for i in flat_inputs if isinstance(i, torch.Tensor))


def _resize(inpt: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an image (bilinear, antialiased) or a mask (nearest) to (height, width)."""
    mode = InterpolationMode.NEAREST if isinstance(inpt, tv_tensors.Mask) else InterpolationMode.BILINEAR
    return F.resize(inpt, list(size), interpolation=mode, antialias=True)


class RandomRotate90(Transform):
    """Turn by k x 90 degrees, k drawn from 0..3 (for square inputs: the aspect would change otherwise)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


class RandomDownUp(Transform):
    """Resolution robustness: downscale so the short side is uniform in [min_side, full], then back up."""

    def __init__(self, min_side: int = 64) -> None:
        super().__init__()
        self.min_side = int(min_side)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _size(flat_inputs)
        short = min(h, w)
        side = int(torch.randint(min(self.min_side, short), short + 1, ()).item())
        return {"small": (max(1, round(h * side / short)), max(1, round(w * side / short))), "full": (h, w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask) or params["small"] == params["full"]:
            return inpt
        return _resize(_resize(inpt, params["small"]), params["full"])


class RandomJpeg(Transform):
    """JPEG re-compression (Pillow, 4:2:0) at an integer quality uniform in `quality` (inclusive)."""

    def __init__(self, quality: tuple[int, int] = (30, 95)) -> None:
        super().__init__()
        if not 1 <= quality[0] <= quality[1] <= 95:
            raise ValueError(f"JPEG quality range {quality} must satisfy 1 <= low <= high <= 95")
        self.quality = (int(quality[0]), int(quality[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"quality": int(torch.randint(self.quality[0], self.quality[1] + 1, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        buf = io.BytesIO()
        Image.fromarray(inpt.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=params["quality"])
        out = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1).copy())
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomVignette(Transform):
    """Add a dermoscope field: black outside a circle whose radius is a share of the half-diagonal."""

    def __init__(self, radius: tuple[float, float] = (0.55, 0.95), edge: float = 0.04) -> None:
        super().__init__()
        self.radius, self.edge = (float(radius[0]), float(radius[1])), float(edge)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _size(flat_inputs)
        r = float(torch.empty(()).uniform_(*self.radius)) * math.hypot(h, w) / 2
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij")
        dist = torch.sqrt(yy**2 + xx**2)
        soft = max(1.0, self.edge * r)
        return {"keep": ((r - dist) / soft).clamp(0.0, 1.0)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        out = (inpt.float() * params["keep"]).round().to(inpt.dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def field_circle(image: torch.Tensor, dark: int = 24) -> tuple[float, float, float] | None:
    """(cy, cx, r) of the bright dermoscope field inside a dark border, or None: a field needs all four
    corners dark and at least 3% of the image outside it (a dark lesion alone is no field)."""
    lum = image.float().mean(dim=0)
    corners = (lum[:3, :3], lum[:3, -3:], lum[-3:, :3], lum[-3:, -3:])
    bright = lum > dark
    share = float(bright.float().mean())
    if any(float(c.mean()) > dark for c in corners) or not 0.1 <= share <= 0.97:
        return None
    ys, xs = torch.nonzero(bright, as_tuple=True)
    return float(ys.float().mean()), float(xs.float().mean()), math.sqrt(float(bright.sum()) / math.pi)


class RemoveField(Transform):
    """Remove a dark dermoscope field: crop the inscribed rectangle (image aspect) of its circle, resize
    back. Images without such a border pass unchanged."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _size(flat_inputs)
        circle = field_circle(_first_image(flat_inputs))
        if circle is None:
            return {"box": None, "size": (h, w)}
        cy, cx, r = circle
        half_h = r / math.hypot(1.0, w / h)
        half_w = half_h * w / h
        top, left = max(0, round(cy - half_h)), max(0, round(cx - half_w))
        bottom, right = min(h, round(cy + half_h)), min(w, round(cx + half_w))
        ok = bottom - top >= 8 and right - left >= 8
        return {"box": (top, left, bottom - top, right - left) if ok else None, "size": (h, w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["box"] is None:
            return inpt
        return _resize(F.crop(inpt, *params["box"]), params["size"])


class RandomZoom(Transform):
    """Scale jitter: zoom factor z uniform in `scale`; z > 1 crops a random 1/z window and resizes it up,
    z < 1 shrinks the image by z and pads it back to size by reflection at a random offset."""

    def __init__(self, scale: tuple[float, float] = (0.7, 1.4)) -> None:
        super().__init__()
        if not 0.5 <= scale[0] <= scale[1]:
            raise ValueError(f"zoom range {scale} must satisfy 0.5 <= low <= high")
        self.scale = (float(scale[0]), float(scale[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _size(flat_inputs)
        z = float(torch.empty(()).uniform_(*self.scale))
        ih, iw = max(1, round(h / z)), max(1, round(w / z))
        if z >= 1.0:
            top = int(torch.randint(0, h - ih + 1, ()).item())
            left = int(torch.randint(0, w - iw + 1, ()).item())
            return {"crop": (top, left, ih, iw), "size": (h, w)}
        sh, sw = max(1, round(h * z)), max(1, round(w * z))
        top = int(torch.randint(0, h - sh + 1, ()).item())
        left = int(torch.randint(0, w - sw + 1, ()).item())
        return {"shrink": (sh, sw), "pad": [left, top, w - sw - left, h - sh - top], "size": (h, w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if "crop" in params:
            return _resize(F.crop(inpt, *params["crop"]), params["size"])
        return F.pad(_resize(inpt, params["shrink"]), params["pad"], padding_mode="reflect")
