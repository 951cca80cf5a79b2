"""One label taxonomy: fine diagnoses, benign/malignant, anatomic sites, confirmation types.

Canonical fine codes follow HAM10000 (plus ``scc`` and ``unk`` from ISIC 2019). Class order follows the
ISIC 2018 Task 3 / ISIC 2019 submission columns, so probabilities line up with ISIC CSVs directly.
"""

from __future__ import annotations

# Fine diagnosis codes in ISIC column order. HAM10000 uses the first seven.
FINE_CODES: tuple[str, ...] = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")
HAM_CLASSES: tuple[str, ...] = FINE_CODES[:7]
ISIC2019_CLASSES: tuple[str, ...] = FINE_CODES
UNKNOWN = "unk"

MALIGNANT: frozenset[str] = frozenset({"mel", "bcc", "akiec", "scc"})
COARSE_CLASSES: tuple[str, ...] = ("benign", "malignant")

FINE_NAMES: dict[str, str] = {
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bkl": "benign keratosis (seborrheic keratosis, solar lentigo, lichen-planus-like keratosis)",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
    "scc": "squamous cell carcinoma",
    "unk": "unknown / other",
}

# ISIC submission column for each fine code (ISIC 2018 calls akiec AKIEC, ISIC 2019 calls it AK).
ISIC2018_COLUMNS: dict[str, str] = {c: c.upper() for c in HAM_CLASSES}
ISIC2019_COLUMNS: dict[str, str] = {**ISIC2018_COLUMNS, "akiec": "AK", "scc": "SCC"}

# Every label spelling a reader may meet, lower-cased, mapped to a fine code.
_LABEL_ALIASES: dict[str, str] = {
    # HAM10000 dx codes and ISIC 2019 columns
    **{c: c for c in FINE_CODES},
    "ak": "akiec",
    "unk": UNKNOWN,
    # ISIC 2017 and isic-metadata's legacy diagnosis vocabulary
    "melanoma": "mel",
    "nevus": "nv",
    "melanocytic nevus": "nv",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "squamous cell carcinoma": "scc",
    "seborrheic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichenoid keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "angioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
}

# HAM10000 `localization` -> ISIC `anatom_site_general` (isic-metadata's AnatomSiteGeneralEnum).
# "torso" is a dermlens extension: HAM's "trunk" does not say anterior or posterior, and isic-metadata's
# vocabulary has no unspecified-torso value; mapping it to either side would invent information.
SITES: tuple[str, ...] = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "anterior torso",
    "posterior torso",
    "lateral torso",
    "torso",
    "palms/soles",
    "oral/genital",
)
_SITE_ALIASES: dict[str, str] = {
    **{s: s for s in SITES},
    "back": "posterior torso",
    "abdomen": "anterior torso",
    "chest": "anterior torso",
    "trunk": "torso",
    "face": "head/neck",
    "scalp": "head/neck",
    "neck": "head/neck",
    "ear": "head/neck",
    "hand": "upper extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    "genital": "oral/genital",
}
_MISSING = {"", "unknown", "nan", "none", "na", "n/a"}

# HAM10000 dx_type -> isic-metadata DiagnosisConfirmTypeEnum.
CONFIRM_TYPES: dict[str, str] = {
    "histo": "histopathology",
    "follow_up": "serial imaging showing no change",
    "consensus": "single image expert consensus",
    "confocal": "confocal microscopy with consensus dermoscopy",
}
SEXES: tuple[str, ...] = ("female", "male")


class UnknownLabelError(ValueError):
    """A diagnosis label that the taxonomy cannot map."""


def fine_code(label: object) -> str:
    """Map any known diagnosis spelling to its canonical fine code, or raise UnknownLabelError."""
    key = " ".join(str(label).strip().lower().replace("_", " ").split())
    if key not in _LABEL_ALIASES:
        raise UnknownLabelError(f"unknown diagnosis label {label!r}")
    return _LABEL_ALIASES[key]


def coarse_label(code: str) -> str:
    """Benign or malignant for a fine code; unknown stays unknown; anything else raises UnknownLabelError."""
    if code == UNKNOWN:
        return UNKNOWN
    if code not in FINE_CODES:
        raise UnknownLabelError(f"{code!r} is not a fine diagnosis code (use fine_code() first)")
    return "malignant" if code in MALIGNANT else "benign"


def site_general(value: object) -> str | None:
    """Normalize a body-site string to the ISIC general vocabulary; None when missing or unmappable."""
    key = str(value).strip().lower() if value is not None else ""
    if key in _MISSING:
        return None
    return _SITE_ALIASES.get(key)


def sex_value(value: object) -> str | None:
    """Normalize sex to 'female'/'male', None when missing."""
    key = str(value).strip().lower() if value is not None else ""
    return key if key in SEXES else None


def confirm_type(value: object) -> str | None:
    """Map a HAM10000 dx_type (or an ISIC value) to isic-metadata's confirmation vocabulary."""
    key = str(value).strip() if value is not None else ""
    if key.lower() in _MISSING:
        return None
    return CONFIRM_TYPES.get(key.lower(), key)


def label_space(codes: list[str] | set[str]) -> tuple[str, ...]:
    """The ordered label space for a dataset: HAM's 7 classes, or all 8 if scc appears."""
    present = set(codes) - {UNKNOWN}
    return ISIC2019_CLASSES if "scc" in present else HAM_CLASSES
