"""Read, validate and write ISIC-format and dermlens-format probability CSVs.

ISIC format: an ``image`` column plus one column per class, either the ISIC 2018 Task 3 columns
``MEL,NV,BCC,AKIEC,BKL,DF,VASC`` or the ISIC 2019 columns ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`` (UNK is
optional when reading). A ``.jpg`` suffix on image ids is dropped, as the ISIC scorer does. Truth CSVs
hold one-hot rows; their ``score_weight``/``validation_weight`` columns, if present, are ignored.
dermlens format: ``image_id`` plus one ``p_<code>`` column per fine code (``p_mel, p_nv, ...``).
Every problem raises ``PredictionFileError`` whose message names the file and the offending rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermlens.data.taxonomy import FINE_CODES, HAM_CLASSES, ISIC2018_COLUMNS, ISIC2019_COLUMNS, UNKNOWN
from dermlens.errors import PredictionFileError  # noqa: F401 (re-exported)

ISIC_WEIGHT_COLUMNS = ("score_weight", "validation_weight")
CODE_ORDER: tuple[str, ...] = (*FINE_CODES, UNKNOWN)
_SHOW = 5  # offending ids listed in an error message


@dataclass(frozen=True)
class ProbTable:
    """Image ids, class codes (taxonomy fine codes, maybe 'unk') and an [N, C] value matrix."""

    images: tuple[str, ...]
    classes: tuple[str, ...]
    values: np.ndarray
    source: str = "<memory>"

    def labels(self) -> np.ndarray:
        """Truth class index per row (rows are one-hot)."""
        return self.values.argmax(axis=1)

    def column(self, code: str) -> np.ndarray:
        return (
            self.values[:, self.classes.index(code)] if code in self.classes else np.zeros(len(self.images))
        )


def _names(items: Sequence, n: int = _SHOW) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def _isic_columns(columns: Sequence[str], name: str) -> dict[str, str]:
    """Map ISIC column names to fine codes; raise on a missing, ambiguous or unknown column."""
    cols = [c for c in columns if c != "image" and c not in ISIC_WEIGHT_COLUMNS]
    upper = {c: c.strip().upper() for c in cols}
    style2019 = any(u in ("AK", "SCC", "UNK") for u in upper.values())
    if style2019 and "AKIEC" in upper.values():
        raise PredictionFileError(f"{name}: mixes ISIC 2018 (AKIEC) and ISIC 2019 (AK/SCC/UNK) columns")
    mapping = ISIC2019_COLUMNS if style2019 else ISIC2018_COLUMNS
    wanted = {v: k for k, v in mapping.items()} | ({"UNK": UNKNOWN} if style2019 else {})
    missing = [col for col in mapping.values() if col not in upper.values()]
    if missing:
        style = "ISIC 2019" if style2019 else "ISIC 2018"
        raise PredictionFileError(f"{name}: missing {style} column(s) {_names(missing, 9)}")
    extra = [c for c, u in upper.items() if u not in wanted]
    if extra:
        raise PredictionFileError(f"{name}: unexpected column(s) {_names(extra, 9)}")
    if len(set(upper.values())) != len(upper):
        raise PredictionFileError(f"{name}: duplicate class columns")
    return {c: wanted[u] for c, u in upper.items()}


def _read_frame(path: str | Path, id_column: str) -> pd.DataFrame:
    name = str(path)
    try:
        df = pd.read_csv(path, dtype={id_column: str})
    except FileNotFoundError as e:
        raise PredictionFileError(f"{name}: file not found") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionFileError(f"{name}: not a readable CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    if id_column not in df.columns:
        raise PredictionFileError(f"{name}: no {id_column!r} column (columns: {_names(df.columns, 12)})")
    if df.empty:
        raise PredictionFileError(f"{name}: no rows")
    ids = df[id_column].astype(str).str.strip().str.replace(r"\.jpe?g$", "", case=False, regex=True)
    if df[id_column].isna().any():
        raise PredictionFileError(
            f"{name}: empty {id_column} in row(s) {_names(np.flatnonzero(df[id_column].isna()) + 2)}"
        )
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise PredictionFileError(f"{name}: duplicate image id(s) {_names(dup)}")
    df[id_column] = ids
    return df


def _values(df: pd.DataFrame, cols: list[str], ids: pd.Series, name: str) -> np.ndarray:
    """Numeric [N, C] values in [0, 1]; raise naming non-numeric columns or bad rows."""
    num = df[cols].apply(pd.to_numeric, errors="coerce")
    bad_cols = [c for c in cols if (num[c].isna() & df[c].notna()).any()]
    if bad_cols:
        raise PredictionFileError(f"{name}: non-numeric value(s) in column(s) {_names(bad_cols, 9)}")
    v = num.to_numpy(np.float64)
    rows = ~np.isfinite(v).all(axis=1)
    if rows.any():
        raise PredictionFileError(f"{name}: missing value(s) for image(s) {_names(ids[rows])}")
    rows = ((v < 0) | (v > 1)).any(axis=1)
    if rows.any():
        raise PredictionFileError(f"{name}: values outside [0, 1] for image(s) {_names(ids[rows])}")
    return v


def _table(df: pd.DataFrame, id_col: str, col_codes: dict[str, str], name: str) -> ProbTable:
    codes = sorted(col_codes.items(), key=lambda kv: CODE_ORDER.index(kv[1]))
    cols = [c for c, _ in codes]
    values = _values(df, cols, df[id_col], name)
    return ProbTable(tuple(df[id_col]), tuple(code for _, code in codes), values, name)


def check_probabilities(table: ProbTable, tolerance: float = 0.01) -> ProbTable:
    """Require rows summing to 1 within ``tolerance``.

    Values are used as given, not renormalized (as the ISIC scorer does): dividing by row sums would
    break exact score ties between images and change rank metrics.
    """
    s = table.values.sum(axis=1)
    bad = np.abs(s - 1.0) > tolerance
    if bad.any():
        ids = [f"{table.images[i]} (sum {s[i]:.4g})" for i in np.flatnonzero(bad)]
        raise PredictionFileError(
            f"{table.source}: probabilities must sum to 1 per row (tolerance {tolerance}); "
            f"{int(bad.sum())} row(s) do not: {_names(ids)}"
        )
    return table


def read_isic_csv(path: str | Path) -> ProbTable:
    """An ISIC 2018 or 2019 CSV as a ProbTable (values validated to lie in [0, 1])."""
    df = _read_frame(path, "image")
    return _table(df, "image", _isic_columns(list(df.columns), str(path)), str(path))


def read_dermlens_csv(path: str | Path) -> ProbTable:
    """A dermlens predictions CSV: ``image_id`` + ``p_<code>`` columns (other columns are ignored)."""
    df = _read_frame(path, "image_id")
    col_codes = {c: c[2:] for c in df.columns if c.startswith("p_")}
    unknown = [c for c, code in col_codes.items() if code not in CODE_ORDER]
    if unknown:
        raise PredictionFileError(f"{path}: unknown class column(s) {_names(unknown, 9)}")
    if not col_codes:
        raise PredictionFileError(f"{path}: no p_<class> probability columns")
    return _table(df, "image_id", col_codes, str(path))


def read_predictions(path: str | Path, tolerance: float = 0.01) -> ProbTable:
    """Predictions in ISIC (``image``) or dermlens (``image_id`` + ``p_*``) format, rows summing to 1."""
    try:
        header = pd.read_csv(path, nrows=0).columns.str.strip()
    except FileNotFoundError as e:
        raise PredictionFileError(f"{path}: file not found") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionFileError(f"{path}: not a readable CSV ({e})") from e
    table = read_isic_csv(path) if "image" in header else read_dermlens_csv(path)
    return check_probabilities(table, tolerance)


def read_truth(path: str | Path) -> ProbTable:
    """An ISIC truth CSV: one-hot rows (exactly one 1, rest 0)."""
    table = read_isic_csv(path)
    v = table.values
    bad = ~(np.isin(v, (0.0, 1.0)).all(axis=1) & (v.sum(axis=1) == 1))
    if bad.any():
        ids = np.asarray(table.images)[bad]
        raise PredictionFileError(f"{path}: truth rows must be one-hot; not for image(s) {_names(ids)}")
    return table


def align(truth: ProbTable, preds: ProbTable) -> tuple[ProbTable, ProbTable]:
    """Put predictions in the truth's image order on a shared class space; raise on any mismatch.

    The class space is the truth's classes, plus 'unk' if the predictions have it. 'unk' is dropped when
    no truth row is UNK and the predictions have no UNK column. A truth class without a prediction
    column is an error, except 'unk' (its probability is then 0).
    """
    t_set, p_set = set(truth.images), set(preds.images)
    missing, extra = [i for i in truth.images if i not in p_set], [i for i in preds.images if i not in t_set]
    if missing:
        raise PredictionFileError(
            f"{preds.source}: no prediction for {len(missing)} truth image(s): {_names(missing)}"
        )
    if extra:
        raise PredictionFileError(f"{preds.source}: {len(extra)} image(s) not in the truth: {_names(extra)}")
    lacking = [c for c in truth.classes if c not in preds.classes and c != UNKNOWN]
    if lacking:
        raise PredictionFileError(
            f"{preds.source}: no probability column for truth class(es) {_names(lacking)}"
        )
    surplus = [c for c in preds.classes if c not in truth.classes and c != UNKNOWN]
    if surplus:
        raise PredictionFileError(
            f"{preds.source}: class column(s) {_names(surplus)} are not in the truth's label space "
            f"({', '.join(truth.classes)})"
        )
    keep_unk = UNKNOWN in preds.classes or truth.column(UNKNOWN).any()
    classes = tuple(c for c in CODE_ORDER if c in set(truth.classes) | set(preds.classes))
    classes = tuple(c for c in classes if c != UNKNOWN or keep_unk)
    order = pd.Index(preds.images).get_indexer(truth.images)
    p = np.stack([preds.column(c)[order] for c in classes], axis=1)
    t = np.stack([truth.column(c) for c in classes], axis=1)
    return (
        ProbTable(truth.images, classes, t, truth.source),
        ProbTable(truth.images, classes, p, preds.source),
    )


def write_isic_csv(
    path: str | Path,
    images: Sequence[str],
    values: np.ndarray,
    classes: Sequence[str],
    *,
    style: str = "2019",
    unk_column: bool = True,
) -> Path:
    """Write an ISIC CSV; classes absent from ``classes`` get 0 columns (UNK only if ``unk_column``)."""
    if style not in ("2018", "2019"):
        raise ValueError("style must be '2018' or '2019'")
    mapping = dict(ISIC2018_COLUMNS if style == "2018" else ISIC2019_COLUMNS)
    if style == "2019" and unk_column:
        mapping[UNKNOWN] = "UNK"
    classes = list(classes)
    outside = [c for c in classes if c not in mapping]
    values = np.asarray(values, np.float64)
    if outside and values[:, [classes.index(c) for c in outside]].any():
        raise ValueError(f"classes {outside} have no ISIC {style} column")
    df = pd.DataFrame({"image": list(images)})
    for code, col in mapping.items():
        df[col] = values[:, classes.index(code)] if code in classes else 0.0
    path = Path(path)
    df.to_csv(path, index=False, float_format="%.10g")
    return path


def write_dermlens_csv(
    path: str | Path, images: Sequence[str], probs: np.ndarray, classes: Sequence[str]
) -> Path:
    """Write ``image_id`` + ``p_<code>`` columns."""
    df = pd.DataFrame({"image_id": list(images)})
    for k, code in enumerate(classes):
        df[f"p_{code}"] = np.asarray(probs)[:, k]
    path = Path(path)
    df.to_csv(path, index=False, float_format="%.10g")
    return path


def one_hot(images: Sequence[str], labels: Sequence[str], classes: Sequence[str] = HAM_CLASSES) -> ProbTable:
    """A truth ProbTable from per-image fine codes."""
    classes = tuple(classes)
    idx = np.array([classes.index(c) for c in labels])
    return ProbTable(tuple(images), classes, np.eye(len(classes))[idx])


def read_image_table(path: str | Path) -> pd.DataFrame:
    """Side information per image from a dermlens manifest or an ISIC metadata CSV.

    Returns columns ``image`` plus whichever exist of ``group`` (group_id, else lesion_id),
    ``image_path``, ``split`` and ``diagnosis``.
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError as e:
        raise PredictionFileError(f"{path}: file not found") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionFileError(f"{path}: not a readable CSV ({e})") from e
    id_col = "image_id" if "image_id" in df.columns else "image" if "image" in df.columns else None
    if id_col is None:
        raise PredictionFileError(f"{path}: needs an 'image_id' or 'image' column")
    out = pd.DataFrame({"image": df[id_col].str.strip().str.replace(r"\.jpe?g$", "", case=False, regex=True)})
    group_col = next((c for c in ("group_id", "lesion_id") if c in df.columns), None)
    if group_col:
        out["group"] = df[group_col]
    for c in ("image_path", "split", "diagnosis"):
        if c in df.columns:
            out[c] = df[c]
    return out.drop_duplicates("image", keep="first").reset_index(drop=True)
