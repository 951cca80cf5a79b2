"""One label taxonomy: fine diagnoses, benign/malignant, anatomic sites, confirmation types.

Canonical fine codes follow HAM10000 (plus ``scc`` and ``unk`` from ISIC 2019). Class order follows the
ISIC 2018 Task 3 / ISIC 2019 submission columns, so probabilities line up with ISIC CSVs directly.
"""

from __future__ import annotations

from dermlens.errors import UnknownLabelError  # noqa: F401 (re-exported)

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

# SNOMED CT concept for a fine code (FHIR conclusionCode, DICOM SR findings): {code: (sctid, display)}.
# Only codes checked against a published source are listed: pydicom's SCT dictionary (codes.SCT) for mel,
# akiec and scc; basal cell carcinoma of skin (254701007) and melanocytic nevus (400096001, the parent of
# every nevus subtype) as published in SNOMED CT. No single concept matches bkl, df or vasc (each pools
# several diagnoses), so they have none; readers must allow that (the DICOM SR gives them private codes).
FINE_SNOMED: dict[str, tuple[str, str]] = {
    "mel": ("1162635006", "Malignant melanoma"),  # codes.SCT.MalignantMelanoma
    "nv": ("400096001", "Melanocytic nevus"),
    "bcc": ("254701007", "Basal cell carcinoma of skin"),
    "akiec": ("201101007", "Actinic keratosis"),  # codes.SCT.ActinicKeratosis
    "scc": ("1162767002", "Squamous cell carcinoma"),  # codes.SCT.SquamousCellCarcinoma
}

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
    # ISIC Archive diagnosis hierarchy (isic-metadata's DiagnosisEnum, levels diagnosis_2..5). A reader
    # walks a row's levels from the deepest up and takes the first term listed here (archive_fine_code).
    "malignant melanocytic proliferations (melanoma)": "mel",
    "melanoma invasive": "mel",
    "melanoma in situ": "mel",
    "melanoma, nos": "mel",
    "melanoma metastasis": "mel",
    "solar or actinic keratosis": "akiec",
    "squamous cell carcinoma in situ": "akiec",  # HAM10000's akiec includes Bowen's disease
    "squamous cell carcinoma, invasive": "scc",
    "squamous cell carcinoma, nos": "scc",
    "keratoacanthoma": "scc",
    "lichen planus like keratosis": "bkl",
    "hemangioma": "vasc",
    "hemorrhage": "vasc",  # HAM10000's vasc includes haemorrhage
}
ARCHIVE_LEVELS: tuple[str, ...] = tuple(f"diagnosis_{i}" for i in range(1, 6))

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

# DICOM AnatomicRegionSequence codes (SNOMED CT, scheme SCT or the retired SRT) -> site. The first code of
# each site is the one dermlens writes; the others are read. Meanings follow pydicom's SCT dictionary.
SNOMED_SITES: dict[str, str] = {
    "69536005": "head/neck",  # Head
    "45048000": "head/neck",  # Neck
    "774007": "head/neck",  # Head and Neck
    "89545001": "head/neck",  # Face
    "41695006": "head/neck",  # Scalp
    "117590005": "head/neck",  # Ear
    "48477009": "head/neck",  # Lip
    "53120007": "upper extremity",  # Upper limb
    "40983000": "upper extremity",  # Upper arm
    "14975008": "upper extremity",  # Forearm
    "85562004": "upper extremity",  # Hand
    "7569003": "upper extremity",  # Finger
    "16982005": "upper extremity",  # Shoulder
    "61685007": "lower extremity",  # Lower limb
    "68367000": "lower extremity",  # Thigh
    "30021000": "lower extremity",  # Lower leg
    "72696002": "lower extremity",  # Knee
    "56459004": "lower extremity",  # Foot
    "29707007": "lower extremity",  # Toe
    "816094009": "anterior torso",  # Chest / Thorax
    "818981001": "anterior torso",  # Abdomen
    "113345001": "anterior torso",  # Abdominal structure
    "76752008": "anterior torso",  # Breast
    "77568009": "posterior torso",  # Back
    "58602004": "lateral torso",  # Flank
    "22943007": "torso",  # Trunk
    "70887009": "palms/soles",  # Skin of palm of hand
    "57999000": "palms/soles",  # Sole of foot
    "123851003": "oral/genital",  # Mouth
    "74262004": "oral/genital",  # Oral cavity
    "18911002": "oral/genital",  # Penis
    "45292006": "oral/genital",  # Vulva
    "20233005": "oral/genital",  # Scrotum
    "38864007": "oral/genital",  # Perineum
}
SNOMED_SCHEMES: frozenset[str] = frozenset({"SCT", "SRT"})

# HAM10000 dx_type -> isic-metadata DiagnosisConfirmTypeEnum.
CONFIRM_TYPES: dict[str, str] = {
    "histo": "histopathology",
    "follow_up": "serial imaging showing no change",
    "consensus": "single image expert consensus",
    "confocal": "confocal microscopy with consensus dermoscopy",
}
SEXES: tuple[str, ...] = ("female", "male")


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


def snomed_site(code: object, scheme: object = "SCT") -> str | None:
    """The site of a SNOMED CT anatomic region code; None when unknown or another coding scheme."""
    if str(scheme or "").strip().upper() not in SNOMED_SCHEMES:
        return None
    return SNOMED_SITES.get(str(code or "").strip())


def site_snomed(site: str) -> str | None:
    """The SNOMED CT code dermlens writes for a site (the first one listed in SNOMED_SITES)."""
    return next((code for code, s in SNOMED_SITES.items() if s == site), None)


def archive_fine_code(levels: list[object]) -> str | None:
    """Fine code of an ISIC Archive diagnosis_1..5 hierarchy: the deepest level that maps, else None."""
    for term in reversed(levels):
        if term is None or (isinstance(term, float) and term != term) or not str(term).strip():
            continue
        try:
            return fine_code(term)
        except UnknownLabelError:
            continue
    return None


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
