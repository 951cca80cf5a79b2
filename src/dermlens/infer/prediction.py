"""Prediction: one image's result, the one type every surface is derived from (the API's JSON, the CSV row of
`dermlens predict`, the records row, the DICOM SR, the FHIR report and the page). Add a field here and it
reaches all of them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dermlens import DISCLAIMER

Scalar = str | float | int | bool | None


class Prediction(BaseModel):
    """One image's prediction. Probabilities are calibrated; dict keys follow the model's class order."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    top_class: str = Field(description="Fine diagnosis code with the highest calibrated probability")
    top_class_name: str = Field(description="Full name of the top diagnosis")
    confidence: float = Field(description="Calibrated probability of the top class")
    fine: dict[str, float] = Field(description="Probability per fine diagnosis code")
    coarse: dict[str, float] = Field(description="Probability of benign and malignant (coarse head)")
    p_malignant: float = Field(description="Calibrated probability of malignant (coarse head)")
    prediction_set: list[str] | None = Field(
        None, description="Conformal prediction set, most probable first (None: the bundle has none)"
    )
    set_coverage: float | None = Field(None, description="Target coverage of the set, e.g. 0.9")
    calibration_condition: Literal["meta", "no_meta"] = Field(
        description="Calibration used: meta (age/sex/site given) or no_meta"
    )
    refer: bool = Field(description="True: refer to a dermatologist (the one refer rule, any reason)")
    refer_codes: list[str] = Field(
        default_factory=list,
        description="Machine-readable reasons: ood, not_dermoscopy, low_confidence, set_too_large",
    )
    refer_reason: str | None = Field(None, description="The reasons in plain words (None: not referred)")
    ood: bool = Field(description="True: refused as unlike the dermoscopic images the model learned from")
    ood_score: float = Field(description="Out-of-distribution score (higher = less like the training images)")
    not_dermoscopy: bool = Field(description="True: looks like an ordinary clinical or phone photo")
    not_dermoscopy_score: float | None = Field(
        None, description="Not-dermoscopy head logit (higher = more like a phone photo)"
    )
    model_name: str
    model_version: str
    precision: str = Field(description="ONNX graph used: fp32 or int8")
    image_width: int | None = Field(None, description="Width of the decoded input image")
    image_height: int | None = Field(None, description="Height of the decoded input image")
    timing_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage")
    disclaimer: str = Field(DISCLAIMER, description="Not a medical device; not a diagnosis")
    cam_png: bytes | None = Field(None, exclude=True, repr=False, description="CAM overlay PNG (binary)")

    @property
    def refused(self) -> bool:
        """True when the image was refused outright (not dermoscopy, or out of distribution)."""
        return self.ood or self.not_dermoscopy

    def stored(self) -> dict[str, Any]:
        """The JSON-ready fields a record keeps: everything but timings, the CAM and the disclaimer."""
        return self.model_dump(exclude={"timing_ms", "cam_png", "disclaimer"})

    def row(self) -> dict[str, Scalar]:
        """One flat row (CSV, records export): lists joined by '|'; p_<code> and coarse_<name> columns."""
        out: dict[str, Scalar] = {}
        for key, value in self.stored().items():
            if key == "fine":
                out.update({f"p_{c}": p for c, p in value.items()})
            elif key == "coarse":
                out.update({f"coarse_{c}": p for c, p in value.items()})
            elif isinstance(value, list):
                out[key] = "|".join(value)
            else:
                out[key] = value
        return out

    @classmethod
    def columns(cls, classes: tuple[str, ...], coarse_classes: tuple[str, ...]) -> list[str]:
        """The column names of `row()` for a model's classes, in order."""
        names: list[str] = []
        for key in cls.model_fields:
            if key in ("timing_ms", "cam_png", "disclaimer"):
                continue
            if key == "fine":
                names += [f"p_{c}" for c in classes]
            elif key == "coarse":
                names += [f"coarse_{c}" for c in coarse_classes]
            else:
                names.append(key)
        return names
