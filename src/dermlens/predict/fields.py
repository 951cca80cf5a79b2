"""Patient metadata as people type it (API form fields, `dermlens predict --age/--sex/--site`): one strict
parser for both. Ambiguous input (non-ASCII digits, `4_2`, `1e2`, NaN, out-of-range) is refused, never
silently treated as missing."""

from __future__ import annotations

import re

from dermlens.data.taxonomy import SEXES, SITES, sex_value, site_general
from dermlens.errors import InputError  # noqa: F401 (re-exported)

_PLAIN_DECIMAL = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3})?")  # ASCII digits only: no ٣٠, ３０, 4_2, 1e2, nan
_MISSING = frozenset({"", "unknown"})
QUOTE_CHARS = 40


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """repr() of user input, cut to `limit` characters so an error message never echoes a whole field."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value):,} characters)"


def _missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in _MISSING


def parse_age(value: str | None) -> float | None:
    """Age in years as a plain decimal (e.g. 45 or 45.5) between 0 and 120, or None when empty."""
    if _missing(value):
        return None
    text = value.strip()
    if not _PLAIN_DECIMAL.fullmatch(text):
        raise InputError("invalid_age", f"age must be a plain decimal number of years, got {quote(value)}")
    age = float(text)
    if not 0 <= age <= 120:
        raise InputError("invalid_age", f"age must be between 0 and 120, got {quote(value)}")
    return age


def parse_sex(value: str | None) -> str | None:
    """'female' or 'male', or None when empty."""
    if _missing(value):
        return None
    sex = sex_value(value)
    if sex is None:
        raise InputError(
            "invalid_sex", f"sex must be one of {', '.join(SEXES)} (or empty), got {quote(value)}"
        )
    return sex


def parse_site(value: str | None) -> str | None:
    """An ISIC general anatomic site (aliases accepted), or None when empty."""
    if _missing(value):
        return None
    site = site_general(value)
    if site is None:
        raise InputError(
            "invalid_site", f"site must be one of {', '.join(SITES)} (or empty), got {quote(value)}"
        )
    return site
