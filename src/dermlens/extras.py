"""Optional dependencies: which pyproject extra installs each, and the one-line error when one is missing.

Library code imports an optional module with ``require("sklearn.metrics", "evaluate")``; the CLI turns a
:class:`MissingExtra` (or a ModuleNotFoundError of a known optional module) into ``error: ...`` and exit 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dermlens.errors import MissingExtra  # noqa: F401 (re-exported)

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS: dict[str, str] = {
    "sklearn": "evaluate",
    "scipy": "evaluate",
    "matplotlib": "evaluate",
    "skimage": "evaluate",
    "isic_challenge_scoring": "evaluate",
    "torch": "train",
    "timm": "train",
    "lightning": "train",
    "torchmetrics": "train",
    "torchvision": "train",
    "tensorboard": "train",
    "onnx": "train",
    "optuna": "train",
    "optuna_integration": "train",
    "lightly": "ssl",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "sqlalchemy": "serve",
    "alembic": "serve",
    "psycopg": "postgres",
    "openvino": "openvino",
    "pydicom": "dicom",
    "highdicom": "dicom",
    "ray": "ray",
    "isic_metadata": "isic",
    "fhir": "fhir",
}


def install_hint(extra: str) -> str:
    """The pip command that installs an extra."""
    return f"pip install 'dermlens[{extra}]'"


def missing(module: str, extra: str | None = None, purpose: str = "") -> MissingExtra:
    """The one-line error for a missing optional module."""
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top, "dev")
    need = f"{purpose} needs {top}" if purpose else f"{top} is not installed"
    return MissingExtra(f"{need}: {install_hint(extra)}", name=top)


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional module, or raise MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != module.split(".")[0]:
            raise  # a dependency of the module is broken: not a missing extra
        raise missing(module, extra, purpose) from None


def as_missing_extra(e: BaseException) -> MissingExtra | None:
    """A MissingExtra for `e` when it is one or is a ModuleNotFoundError of a known optional module."""
    if isinstance(e, MissingExtra):
        return e
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in EXTRAS:
        return missing(e.name)
    return None
