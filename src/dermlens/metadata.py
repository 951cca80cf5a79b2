"""The one encoding of patient metadata (age, sex, anatomic site) into a model input vector."""

from __future__ import annotations

import math

import numpy as np

from dermlens.data.taxonomy import SEXES, SITES, sex_value, site_general

# Layout: [age/100, age_missing, one-hot sex..., sex_missing, one-hot site..., site_missing]
META_FIELDS: tuple[str, ...] = (
    "age",
    "age_missing",
    *(f"sex={s}" for s in SEXES),
    "sex_missing",
    *(f"site={s}" for s in SITES),
    "site_missing",
)
META_DIM = len(META_FIELDS)
_N_SEX = len(SEXES)
# Each field's block in the vector: its values followed by its missing flag (the block's last entry).
META_BLOCKS: dict[str, slice] = {
    "age": slice(0, 2),
    "sex": slice(2, 3 + _N_SEX),
    "site": slice(3 + _N_SEX, META_DIM),
}


def _age(value: object) -> float | None:
    """A plausible age in years, or None."""
    try:
        age = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) and 0 <= age <= 120 else None


def encode_metadata(age: object = None, sex: object = None, site: object = None) -> np.ndarray:
    """Encode one patient's metadata; anything missing or unmappable sets its missing flag."""
    v = np.zeros(META_DIM, dtype=np.float32)
    a = _age(age)
    if a is None:
        v[1] = 1.0
    else:
        v[0] = a / 100.0
    s, n_sex = sex_value(sex), len(SEXES)
    v[2 + (SEXES.index(s) if s else n_sex)] = 1.0
    g, off = site_general(site), 3 + n_sex
    v[off + (SITES.index(g) if g else len(SITES))] = 1.0
    return v


def encode_rows(ages: list, sexes: list, sites: list) -> np.ndarray:
    """Encode many rows at once -> float32 [N, META_DIM]."""
    return np.stack([encode_metadata(a, s, g) for a, s, g in zip(ages, sexes, sites, strict=True)])


def mark_missing(vector: np.ndarray, fields: tuple[str, ...] | list[str]) -> np.ndarray:
    """A copy of an encoded vector with the named fields (age, sex, site) set to missing."""
    out = np.array(vector, dtype=np.float32, copy=True)
    for name in fields:
        block = META_BLOCKS[name]
        out[block] = 0.0
        out[block.stop - 1] = 1.0
    return out


def missing_vector() -> np.ndarray:
    """The encoding of an image with no metadata at all."""
    return encode_metadata(None, None, None)
