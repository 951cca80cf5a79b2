"""Pydantic models of the HTTP API: what /health, /model, /predict and /predict/batch return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dermlens.infer.prediction import Prediction


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


class OperatingPointInfo(BaseModel):
    """The refer rule's operating point: its threshold and how often it refers val images, in words."""

    min_confidence: float = Field(description="Refer when the calibrated top probability is below this")
    val_refer_rate: float | None = Field(description="Share of validation images referred at this point")
    packaged_accept_rate: float | None = Field(description="The bundle's own point: val share accepted")
    requested_refer_rate: float | None = Field(description="The refer rate the server was asked to use")
    words: str | None = Field(description="The val refer rate in words, e.g. 'refers about 1 in 5 images'")


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
    refer: OperatingPointInfo
    disclaimer: str
    dermlens_version: str


class Inputs(BaseModel):
    """The metadata used for this prediction, after normalization (None = not given)."""

    age: float | None
    sex: str | None
    site: str | None


class PredictionResponse(Prediction):
    """One image's prediction as the API returns it: the Prediction plus what the request added."""

    record_id: str = Field(description="Id of the stored prediction record")
    filename: str | None
    image_sha256: str
    inputs: Inputs
    cam_png_base64: str | None = Field(
        None, description="Class activation map overlay (PNG, base64) if cam=true"
    )
    dicom_sr_base64: str | None = Field(
        None, description="DICOM Structured Report of this prediction (base64) if dicom_sr=true"
    )
    sr_stored: bool | None = Field(
        None, description="store_sr=true: whether the PACS stored the SR (the record is kept either way)"
    )
    sr_store_error: str | None = Field(None, description="Why the PACS did not store the SR")


class BatchItem(BaseModel):
    """One file of a batch: either a result or an error."""

    filename: str | None
    ok: bool
    result: PredictionResponse | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    disclaimer: str


class OutcomeIn(BaseModel):
    """A confirmed diagnosis of a stored prediction."""

    model_config = ConfigDict(extra="forbid")
    diagnosis: str = Field(max_length=64, description="Diagnosis: a fine code or any spelling taxonomy maps")
    method: str = Field(max_length=32, description="histopathology, follow-up, consensus or confocal")
    date: str = Field(max_length=32, description="Date of confirmation, YYYY-MM-DD (not in the future)")
    source: str | None = Field(None, max_length=200, description="Who confirmed it, e.g. the laboratory")


class OutcomeResponse(BaseModel):
    """The stored outcome."""

    id: str
    record_id: str
    diagnosis: str = Field(description="Fine diagnosis code")
    method: str
    source: str | None
    confirmed_on: str
    created_at: str
