"""Loading what `dermlens train` wrote (a Lightning checkpoint) or a bundle's model.pt into a DermNet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermlens.bundle import CARD
from dermlens.export import ExportError
from dermlens.model.network import DermNet, build_network
from dermlens.preprocess import Preprocessing


@dataclass
class LoadedModel:
    """A trained network with what it was trained on."""

    net: DermNet
    classes: tuple[str, ...]
    prep: Preprocessing
    model_cfg: dict[str, Any]
    source: Path
    info: dict[str, Any]


def find_checkpoint(run_dir: str | Path) -> Path:
    """A run folder's checkpoints/best.ckpt (else last.ckpt)."""
    run_dir = Path(run_dir)
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    raise ExportError(
        f"no checkpoints/best.ckpt or last.ckpt in {run_dir}: is it a `dermlens train` run folder?"
    )


def _torch_load(path: Path) -> Any:
    """torch.load with the safe (weights-only) unpickler: a file that needs arbitrary code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file, whatever the unpickler disliked
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"cannot load {path} with torch's safe loader (weights_only): {first}") from e


def _eval_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The evaluation network's weights from a LightningModule state dict (the EMA copy when present)."""
    for prefix in ("ema.module.", "net."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def load_checkpoint(path: str | Path) -> LoadedModel:
    """A Lightning checkpoint from `dermlens train`, or a bundle's model.pt (card.json beside it)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    if path.suffix == ".pt" and (path.parent / CARD).is_file():
        card = json.loads((path.parent / CARD).read_text())
        model_cfg, classes = dict(card["training"]["model"]), tuple(card["classes"])
        prep, state, info = (
            Preprocessing.from_dict(card["preprocessing"]),
            _torch_load(path),
            {"from_bundle": True},
        )
    else:
        ckpt = _torch_load(path)
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not hp or "cfg" not in hp or "state_dict" not in ckpt:
            raise ExportError(
                f"{path} is not a dermlens training checkpoint (no hyper_parameters.cfg / state_dict)"
            )
        model_cfg, classes, prep = (
            dict(hp["cfg"]["model"]),
            tuple(hp["classes"]),
            Preprocessing.from_dict(hp["prep"]),
        )
        state = _eval_state(ckpt["state_dict"])
        info = {
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "seed": hp["cfg"].get("seed"),
            "data": hp["cfg"].get("data", {}),
            "augment": hp["cfg"].get("augment", {}),
            "loss": hp["cfg"].get("loss", {}),
            "sampler": hp["cfg"].get("sampler", {}),
            "selection": selection(hp["cfg"]),
        }
    net = build_model(model_cfg, len(classes))
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return LoadedModel(net.float().eval(), classes, prep, model_cfg, path, info)


def selection(cfg: dict[str, Any]) -> dict[str, Any]:
    """How the checkpoint was chosen: the monitored figure, the val/select rule and the sets it combines."""
    from dermlens.train.datamodule import val_set_names

    t = cfg.get("trainer", {})
    sets = val_set_names({"data": cfg.get("data") or {}})
    return {"monitor": t.get("monitor"), "select": t.get("select", "mean"), "val_sets": sets}


def build_model(model_cfg: dict[str, Any], n_fine: int) -> nn.Module:
    """An untrained DermNet, or an EnsembleNet when the config describes one (weights loaded afterwards)."""
    from dermlens.model.ensemble_net import build_ensemble, is_ensemble

    if is_ensemble(model_cfg):
        return build_ensemble(model_cfg, n_fine)
    return build_network({**model_cfg, "init": "random"}, n_fine)


def fp16_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with floating tensors in fp16 (for model.pt)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
