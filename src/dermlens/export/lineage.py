"""Data lineage of a model: which prepared data sets (manifest and split hashes, counts) it saw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dermlens.bundle import open_bundle, write_card


def extra_sources(info: dict[str, Any]) -> list[str]:
    """The extra training sources (`data.extra_train`) of a run, or of every member of an ensemble."""
    runs = [info, *(info.get("members") or [])]
    return list(dict.fromkeys(str(d) for r in runs for d in (r.get("data") or {}).get("extra_train") or []))


def lineage(data_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """What each prepared data set behind a model is: dataset, manifest and split hashes, split counts."""
    from dermlens.data.manifest import DataError, read_manifest, split_hash

    out = []
    for d in data_dirs:
        d = Path(d).expanduser()
        try:
            df = read_manifest(d)
            record = json.loads((d / "splits.json").read_text())
        except (DataError, OSError, ValueError) as e:
            out.append({"dir": str(d), "error": f"not readable here: {e}"})
            continue
        out.append(
            {
                "dir": str(d),
                "dataset": sorted(df["dataset"].astype(str).unique().tolist()),
                "split_method": record.get("method"),
                "seed": record.get("seed"),
                "manifest_hash": record.get("manifest_hash"),
                "split_hash": split_hash(df),
                "counts": record.get("counts"),
            }
        )
    return out


def record_extra_sources(bundle: Path) -> list[dict[str, Any]]:
    """Record in a bundle's card the extra training sources its training record names (for bundles exported
    before export recorded those of ensemble members); a source not readable here is an error."""
    card, _ = open_bundle(bundle)  # an intact bundle: a hand edit is not re-sealed by this
    found = lineage(extra_sources(card.extra.get("training") or {}))
    unreadable = [e for e in found if "error" in e]
    if unreadable:
        raise ValueError(f"{unreadable[0]['dir']}: {unreadable[0]['error']}")
    card.extra.setdefault("lineage", {})["extra_training_data"] = found
    write_card(bundle, card)
    return found
