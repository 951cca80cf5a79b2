"""Pydantic models of the HTTP API: what /health, /model, /predict and /predict/batch return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. not_an_image, image_too_large")
    message: str = Field(description="Human-readable explanation")
    details: list[dict[str, Any]] | None = Field(None, description="Per-field problems (validation errors)")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx response has this body."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        "ok", description="degraded (HTTP 503): predictions cannot be stored, so none are answered"
    )
    records: Literal["ok", "unavailable"] = Field(
        "ok", description="unavailable: the records database is locked, unreachable or hung"
    )
    model_loaded: bool
    model_version: str | None
    dermlens_version: str


class ClassInfo(BaseModel):
    code: str = Field(description="Fine diagnosis code (ISIC column order)")
    name: str = Field(description="Full diagnosis name")
    coarse: str = Field(description="benign or malignant")


class LimitsInfo(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_batch_files: int


class ModelInfo(BaseModel):
    """The loaded model, its card and the vocabularies the prediction form accepts."""

    name: str
    version: str
    architecture: str
    precision: str
    classes: list[ClassInfo]
    coarse_classes: list[str]
    uses_metadata: bool
    sites: list[str] = Field(description="Accepted values of the `site` field")
    sexes: list[str] = Field(description="Accepted values of the `sex` field")
    auth_required: bool = Field(description="Prediction routes need an `Authorization: Bearer` token")
    limits: LimitsInfo
    card: dict[str, Any] = Field(description="The model card (card.json)")
    disclaimer: str
    dermlens_version: str


class Inputs(BaseModel):
    """The metadata used for this prediction, after normalization (None = not given)."""

    age: float | None
    sex: str | None
    site: str | None


class OODInfo(BaseModel):
    score: float | None = Field(
        description="Out-of-distribution score (higher = less like the training images)"
    )
    flagged: bool = Field(description="True: the image was refused as not a dermoscopic lesion image")


class ReferInfo(BaseModel):
    refer: bool = Field(description="True: refer to a dermatologist")
    reason: str | None = Field(description="Why, in plain words (None when not referred)")
    codes: list[str] = Field(
        default_factory=list,
        description="Machine-readable reasons: ood, not_dermoscopy, low_confidence, set_too_large",
    )


class PredictionSetInfo(BaseModel):
    """Conformal prediction set: contains the true diagnosis with probability >= coverage, for each
    diagnosis on its own (class-conditional split-conformal, calibrated on the validation split)."""

    classes: list[str] = Field(description="Diagnosis codes in the set, most probable first")
    coverage: float = Field(description="Target coverage, e.g. 0.9")
    condition: str = Field(description="Calibration condition used: meta (age/sex/site given) or no_meta")


class NotDermoscopyInfo(BaseModel):
    score: float | None = Field(description="Not-dermoscopy head logit (higher = more like a clinical photo)")
    flagged: bool = Field(description="True: the image looks like a clinical/phone photo, not dermoscopy")


class Prediction(BaseModel):
    """One image's prediction. Probabilities are calibrated; keys follow the model's class order."""

    record_id: str = Field(description="Id of the stored prediction record")
    filename: str | None
    image_sha256: str
    inputs: Inputs
    fine: dict[str, float] = Field(description="Probability per fine diagnosis code")
    coarse: dict[str, float] = Field(description="Probability of benign and malignant")
    top_class: str
    top_class_name: str
    confidence: float = Field(description="Calibrated probability of the top class")
    ood: OODInfo
    refer: ReferInfo
    prediction_set: PredictionSetInfo | None = Field(
        None, description="Conformal prediction set (None if the model bundle has no conformal thresholds)"
    )
    not_dermoscopy: NotDermoscopyInfo | None = None
    model_name: str
    model_version: str
    precision: str = Field(description="fp32 or int8 ONNX graph")
    timing_ms: dict[str, float] = Field(
        description="Milliseconds per stage (decode, model, cam, runtime); `total`: the whole request"
    )
    cam_png_base64: str | None = Field(
        None, description="Class activation map overlay (PNG, base64) if cam=true"
    )
    dicom_sr_base64: str | None = Field(
        None, description="DICOM Structured Report of this prediction (base64) if dicom_sr=true"
    )
    disclaimer: str


class BatchItem(BaseModel):
    """One file of a batch: either a result or an error."""

    filename: str | None
    ok: bool
    result: Prediction | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    disclaimer: str
