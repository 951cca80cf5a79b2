"""A DICOM file's patient tags in dermlens's vocabulary: age in years, sex and ISIC general site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermlens.data.taxonomy import sex_value, site_general, snomed_site
from dermlens.dicom import parse_age, read_dataset

_SEX = {"F": "female", "M": "male"}


def region_site(ds: Any) -> str | None:
    """Site from AnatomicRegionSequence (SNOMED codes), else from BodyPartExamined if it names one."""
    for item in getattr(ds, "AnatomicRegionSequence", None) or []:
        site = snomed_site(getattr(item, "CodeValue", None), getattr(item, "CodingSchemeDesignator", None))
        if site:
            return site
    return site_general(str(getattr(ds, "BodyPartExamined", "") or "").replace("_", " "))


def patient_meta(ds: Any) -> dict[str, Any]:
    """age (years), sex ('female'/'male') and site (dermlens vocabulary) from a dataset; None if absent."""
    sex = _SEX.get(str(getattr(ds, "PatientSex", "") or "").strip().upper())
    return {"age": parse_age(getattr(ds, "PatientAge", None)), "sex": sex_value(sex), "site": region_site(ds)}


def read_meta(source: str | Path | bytes) -> dict[str, Any]:
    """Patient metadata from a DICOM file's header (pixels are not read)."""
    return patient_meta(read_dataset(source, pixels=False))
