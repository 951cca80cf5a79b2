"""Dermoscopy images in a PACS, over DICOMweb (dicomweb-client): QIDO-RS finds them, WADO-RS fetches them into
a folder for the folder predictor, and STOW-RS stores one DICOM SR per image back in the image's study.

An SR's UIDs derive from its source image and the model (predict.sr), so storing it again (a retry, a re-run)
gives the PACS the same instance, not a duplicate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermlens import config as configuration
from dermlens.dicom import INSTALL_HINT
from dermlens.errors import BatchInputError, DermlensError, PacsError
from dermlens.infer.prediction import Prediction
from dermlens.predict.folder import BatchSummary, Scored, run_batch
from dermlens.predict.inputs import Failure, Item

_TAGS = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "sop_class": "00080016"}


@dataclass(frozen=True)
class Instance:
    """One instance a QIDO-RS search found."""

    study: str
    series: str
    sop: str
    sop_class: str


@dataclass
class Found:
    """What a search found: the photographs to predict and how many other instances it skipped."""

    instances: list[Instance]
    skipped: dict[str, int] = field(default_factory=dict)  # SOP class name -> count


def settings() -> dict[str, Any]:
    """configs/dicomweb.yaml."""
    return configuration.load("dicomweb")


def check_sources(
    has_inputs: bool, url: str | None, study: str | None, since: str | None, folder: bool
) -> None:
    """Input files or a PACS URL (with exactly one of --study/--since), never both; `folder`: options that
    only apply to input files were given."""
    if url is None:
        if study is not None or since is not None:
            raise BatchInputError("--study and --since select images in a PACS: give --dicomweb URL too")
        if not has_inputs:
            raise BatchInputError("give image files, folders or CSVs to predict, or --dicomweb URL")
        return
    if has_inputs:
        raise BatchInputError("give either input files or --dicomweb, not both")
    if folder:
        raise BatchInputError("--dicomweb stores SRs in the PACS: drop --ray/--cam/--dicom-sr/--fhir")
    if (study is None) == (since is None):
        raise BatchInputError("--dicomweb needs --study UID or --since DATE (one of them)")


def parse_since(text: str) -> dt.date:
    """A --since date: YYYY-MM-DD or YYYYMMDD."""
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise PacsError(f"--since {text!r} is not a date (YYYY-MM-DD)")


def _short(e: Exception) -> str:
    """One line for a requests/HTTP failure."""
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        r = e.response
        return f"HTTP {r.status_code} {r.reason}".strip()
    if isinstance(e, requests.ConnectionError):
        return "cannot connect (is the PACS running and the URL right?)"
    if isinstance(e, requests.Timeout):
        return "no answer within the time-out"
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


class Pacs:
    """A DICOMweb endpoint (QIDO-RS, WADO-RS, STOW-RS at one base URL)."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        cfg = settings()
        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise PacsError(f"DICOMweb needs dicomweb-client: {INSTALL_HINT}") from None
        if not url.startswith(("http://", "https://")):
            raise PacsError(f"DICOMweb URL {url!r} must start with http:// or https://")
        self.url, self.page_size = url.rstrip("/"), int(cfg["page_size"])
        self.sop_classes = frozenset(cfg["sop_classes"])
        self.client = DICOMwebClient(self.url, timeout=timeout_s or float(cfg["timeout_s"]))
        self.client.set_http_retry_params(
            max_attempts=int(cfg["attempts"]), wait_exponential_multiplier=int(cfg["retry_wait_ms"])
        )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, OSError) as e:
            raise PacsError(f"{what} at {self.url}: {_short(e)}") from e

    def find(self, study: str | None = None, since: dt.date | None = None) -> Found:
        """QIDO-RS: the photographs of `study`, or of every study dated `since` or later."""
        filters = {"StudyDate": f"{since:%Y%m%d}-"} if since else None
        rows = self._call(
            "QIDO-RS search",
            self.client.search_for_instances,
            study_instance_uid=study,
            search_filters=filters,
            limit=self.page_size,
            get_remaining=True,
        )
        found = Found([])
        for row in rows:
            inst = Instance(**{k: str((row.get(t) or {}).get("Value", [""])[0]) for k, t in _TAGS.items()})
            if inst.sop_class in self.sop_classes:
                found.instances.append(inst)
            else:
                from pydicom.uid import UID

                name = UID(inst.sop_class).name
                found.skipped[name] = found.skipped.get(name, 0) + 1
        return found

    def fetch(self, inst: Instance) -> Any:
        """WADO-RS: the instance as a pydicom Dataset."""
        return self._call(
            f"WADO-RS fetch of {inst.sop}", self.client.retrieve_instance, inst.study, inst.series, inst.sop
        )

    def store(self, ds: Any) -> None:
        """STOW-RS one dataset into its study; PacsError when the PACS refuses it."""
        resp = self._call(
            f"STOW-RS store of {ds.SOPInstanceUID}",
            self.client.store_instances,
            [ds],
            study_instance_uid=str(ds.StudyInstanceUID),
        )
        failed = getattr(resp, "FailedSOPSequence", None) if resp is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            raise PacsError(f"STOW-RS store of {ds.SOPInstanceUID} at {self.url}: refused (reason {reason})")


def fetch_items(pacs: Pacs, found: Found, folder: Path) -> tuple[list[Item], list[Failure]]:
    """WADO-RS each instance into `folder` as a DICOM file; an item per fetched image, a failure per other."""
    items, failures = [], []
    for n, inst in enumerate(found.instances):
        path = folder / f"{n:06d}.dcm"  # never named from the PACS's tags
        try:
            pacs.fetch(inst).save_as(path, enforce_file_format=True)
        except (PacsError, ValueError, OSError) as e:
            failures.append(Failure(inst.sop, str(e)))
            continue
        items.append(Item(path, inst.sop))
    return items, failures


class SrStore:
    """STOW-RS one SR per predicted image back into its study; counts what was stored, lists what was not."""

    def __init__(self, pacs: Pacs, card_sha256: str | None, sites: dict[str, str | None]) -> None:
        self.pacs, self.card_sha256, self.sites = pacs, card_sha256, sites
        self.stored, self.failures = 0, []

    def store_one(self, path: Path, prediction: Prediction, site: str | None = None) -> str:
        """Build the SR for the DICOM at `path` and store it; returns its SOPInstanceUID (raises one line)."""
        from dermlens.dicom import read_dataset
        from dermlens.predict.sr import build_sr

        source = read_dataset(path, pixels=False)
        sr = build_sr(source, prediction, site, self.card_sha256)
        self.pacs.store(sr)
        return str(sr.SOPInstanceUID)

    def __call__(self, rows: list[Scored]) -> None:
        for s in rows:
            try:
                self.store_one(s.item.path, s.prediction, self.sites.get(s.item.image_id))
                self.stored += 1
            except DermlensError as e:
                self.failures.append(Failure(s.item.image_id, f"no SR stored: {e}"))


@dataclass
class PacsRun:
    """What predicting a PACS's images did: the batch summary, the SRs stored and every failure."""

    summary: BatchSummary
    stored: int
    failures: list[Failure]


def predict_pacs(
    predictor: Any,
    pacs: Pacs,
    found: Found,
    given: dict[str, Any] | None = None,
    out_csv: Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    tta: bool | None = None,
) -> PacsRun:
    """WADO-RS the found images into a temporary folder, predict them with the folder predictor (metadata:
    `given` wins over the tags) and STOW-RS one SR per image; failures name the instance."""
    import tempfile

    from dermlens.bundle import card_sha256
    from dermlens.data.dicom_meta import read_meta
    from dermlens.dicom import merge_meta

    with tempfile.TemporaryDirectory(prefix="dermlens-dicomweb-") as tmp:
        items, failures = fetch_items(pacs, found, Path(tmp))
        for it in items:
            it.meta = merge_meta(given, read_meta(it.path))
        sites = {it.image_id: it.meta["site"] for it in items}
        store = SrStore(pacs, card_sha256(predictor.bundle_dir), sites)
        summary = run_batch(
            predictor, items, out_csv=out_csv, batch_size=batch_size, workers=workers, tta=tta, on_rows=store
        )
    by_path = {str(it.path): it.image_id for it in items}
    for f in summary.failures:  # name the instance, not the temporary file
        f.path = by_path.get(f.path, f.path)
    return PacsRun(summary, store.stored, failures + summary.failures + store.failures)
