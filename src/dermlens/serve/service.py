"""The prediction service behind the routes: upload checks and decoding, scoring through the Predictor
(or the dynamic batcher), DICOM SR, and the record written for every returned prediction.

Long module: the one path from an upload to a stored, answered prediction, shared by both routes.
"""

import base64
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request, UploadFile

from dermlens import DISCLAIMER, __version__
from dermlens.bundle import card_sha256
from dermlens.data.dicom_meta import patient_meta
from dermlens.data.taxonomy import FINE_NAMES, SEXES, SITES, coarse_label
from dermlens.dicom import DicomError, is_dicom_bytes, merge_meta, read_dataset
from dermlens.infer.operating_point import at_refer_rate, describe
from dermlens.infer.prediction import Prediction
from dermlens.predict.fields import InputError, quote
from dermlens.predict.fields import parse_age as _parse_age
from dermlens.predict.fields import parse_sex as _parse_sex
from dermlens.predict.fields import parse_site as _parse_site
from dermlens.preprocess import ImageDecodeError, dicom_info, load_rgb, probe
from dermlens.serve import schemas
from dermlens.serve.batching import DynamicBatcher, QueueFull
from dermlens.serve.errors import ApiError, busy, decode_error
from dermlens.serve.records import NewRecord, RecordStore, RecordsUnavailable
from dermlens.serve.settings import ServeSettings

log = logging.getLogger("dermlens.serve")

PREDICT_FIELDS = frozenset({"file", "age", "sex", "site", "cam", "dicom_sr", "store_sr"})


BATCH_FIELDS = frozenset({"files", "age", "sex", "site", "cam"})


def _api_input(parse, value: str | None):
    try:
        return parse(value)
    except InputError as e:
        raise ApiError(422, e.code, str(e)) from None


def parse_age(value: str | None) -> float | None:
    """Age in years (plain decimal, 0-120) or None; anything else is a 422."""
    return _api_input(_parse_age, value)


def parse_sex(value: str | None) -> str | None:
    return _api_input(_parse_sex, value)


def parse_site(value: str | None) -> str | None:
    return _api_input(_parse_site, value)


def _dicom_call(fn: Any, *args: Any) -> Any:
    """Run a dermlens.dicom function on an upload; its errors become 4xx (415 if the extra is missing)."""
    try:
        return fn(*args)
    except DicomError as e:
        message = str(e).replace("<upload>: ", "", 1)
        if "dermlens[dicom]" in message and "needs" in message:
            raise ApiError(415, "dicom_unsupported", message) from e
        if e.code == "image_too_large":
            raise decode_error(e) from e
        raise ApiError(400, "unsupported_dicom", message) from e


def dicom_sr(up: "Upload", prediction: Prediction, site: str | None, card_sha256: str | None) -> Any:
    """The prediction as a DICOM Structured Report referencing the uploaded DICOM image (4xx if it cannot)."""
    from dermlens.predict.sr import build_sr

    source = up.dicom if up.dicom is not None else _dicom_call(read_dataset, up.data, False)
    return _dicom_call(build_sr, source, prediction, site, card_sha256)


def sr_base64(sr: Any) -> str:
    """A built SR as base64 DICOM Part 10 bytes."""
    import io

    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def timings(runtime: dict[str, float], api: dict[str, float]) -> dict[str, float]:
    """The runtime's stage timings (its own total renamed `runtime`) plus the API's (`record`, `total`)."""
    out = {("runtime" if k == "total" else k): float(v) for k, v in runtime.items()}
    return {k: round(v, 3) for k, v in {**out, **api}.items()}


@dataclass
class Upload:
    filename: str | None
    data: bytes
    source: UploadFile | None = None  # the spooled upload, re-read only if images are stored
    dicom: Any = None  # a DICOM upload's header, read once (tags, size check, SR reference)


def with_dicom_tags(up: Upload, meta: dict[str, Any]) -> dict[str, Any]:
    """A DICOM upload: read its header once (kept on `up`) and fill the form's empty age/sex/site from the
    tags; any other upload: `meta` unchanged. Both prediction routes call this (worker thread)."""
    if not is_dicom_bytes(up.data):
        return meta
    up.dicom = _dicom_call(read_dataset, up.data, False)
    return merge_meta(meta, patient_meta(up.dicom))


@dataclass
class Scored:
    """One upload's prediction, not yet stored."""

    up: Upload
    sha256: str
    nbytes: int
    result: Any
    size: tuple[int, int]
    t0: float
    meta: dict[str, Any] | None = None  # this upload's age/sex/site (a DICOM's tags fill the form's gaps)


class MemoryBudget:
    """Decoded bytes of the images being decoded at once; a reservation that does not fit is refused."""

    def __init__(self, total: int):
        self.total, self.used, self._lock = total, 0, threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Service:
    """The loaded model, the record store and the bounds on work in flight shared by all requests."""

    def __init__(self, settings: ServeSettings, predictor: Any, store: RecordStore):
        predictor = at_refer_rate(predictor, settings.refer_rate)
        self.settings, self.predictor, self.store = settings, predictor, store
        bundle = getattr(predictor, "bundle_dir", None)
        self.card_sha256 = card_sha256(bundle) if bundle is not None else None
        self.pacs: Any = None  # the DICOMweb client, opened on the first store_sr=true
        self.limiter = anyio.CapacityLimiter(settings.inference.max_concurrent)
        self.memory = MemoryBudget(settings.limits.memory_budget_bytes)
        # Model-size resize only: colour constancy (if any) is applied once, by predict_arrays.
        self.geometry = predictor.prep.geometry
        b = settings.inference.batching
        self.batcher = (
            DynamicBatcher(predictor, b.max_batch, b.max_wait_ms, b.max_queue) if b.enabled else None
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def _decode(self, up: Upload, meta: dict[str, Any], cam: bool) -> tuple[Any, tuple[int, int], bool]:
        """Check, decode (within the memory budget) and, unbatched, score one image (worker thread).

        Returns (PredictResult, or the model-size image to batch; (width, height); whether it is a result).
        """
        lim = self.settings.limits
        if len(up.data) > lim.max_upload_bytes:
            raise ApiError(413, "file_too_large", f"file exceeds the {lim.max_upload_bytes:,}-byte limit")
        t0 = time.perf_counter()
        try:
            if up.dicom is not None:  # the header already read for the tags
                info = dicom_info(up.dicom, lim.max_pixels, lim.max_decoded_bytes)
            else:
                info = probe(up.data, lim.max_pixels, lim.max_decoded_bytes)
            need = info.decoded_bytes
            if not self.memory.reserve(need):
                raise busy("the server is decoding too many large images; retry shortly", self.settings)
            try:
                rgb = load_rgb(up.data, lim.max_pixels, lim.max_decoded_bytes)
            finally:
                self.memory.release(need)
        except ImageDecodeError as e:
            raise decode_error(e) from e
        size, decode_ms = (int(rgb.shape[1]), int(rgb.shape[0])), (time.perf_counter() - t0) * 1000.0
        if self.batcher is not None and not cam:  # shrink now (memory); predict_arrays does the rest
            return self.geometry.resize(rgb), size, False
        r = self.predictor.predict_image(rgb, meta, cam)
        return r.model_copy(update={"timing_ms": {"decode": decode_ms, **r.timing_ms}}), size, True

    async def score(self, up: Upload, meta: dict[str, Any], cam: bool) -> Scored:
        """Decode in a worker thread, then score: batched with other requests, or directly."""
        t0 = time.perf_counter()
        if self.batcher is not None:
            self.batcher.arriving(+1)
        try:
            got, size, done = await anyio.to_thread.run_sync(
                self._decode, up, meta, cam, limiter=self.limiter
            )
        finally:
            if self.batcher is not None:
                self.batcher.arriving(-1)
        if not done:
            t1 = time.perf_counter()
            try:
                got = await self.batcher.predict(got, meta, size)
            except QueueFull:
                raise busy("the prediction queue is full; retry shortly", self.settings) from None
            got = got.model_copy(update={"timing_ms": {"decode": (t1 - t0) * 1000.0, **got.timing_ms}})
        return Scored(up, hashlib.sha256(up.data).hexdigest(), len(up.data), got, size, t0, meta)

    async def store_all(self, scored: list[Scored], meta: dict[str, Any]) -> list[Any]:
        """Commit the records of `scored` in one transaction before anything is answered: 503 if the database
        is locked, unreachable or hung past the commit deadline (then nothing stays stored)."""
        if not scored:
            return []
        images = (
            [await _stored_bytes(s.up) for s in scored] if self.store.store_images else [None] * len(scored)
        )
        news = [self._new_record(s, s.meta if s.meta is not None else meta) for s in scored]
        try:
            return await self.store.add_many_async(list(zip(news, images, strict=True)))
        except RecordsUnavailable:
            log.warning("records database unavailable: %d prediction(s) not acknowledged", len(scored))
            raise busy(
                "the records database is busy; nothing was stored, retry shortly", self.settings
            ) from None

    def _new_record(self, s: Scored, meta: dict[str, Any]) -> NewRecord:
        return NewRecord(
            image_sha256=s.sha256,
            image_bytes=s.nbytes,
            filename=s.up.filename,
            **meta,
            prediction=s.result,
            latency_ms=round((time.perf_counter() - s.t0) * 1000.0, 3),
        )

    def prediction(
        self,
        s: Scored,
        row: Any,
        meta: dict[str, Any],
        cam: bool,
        t_end: float,
        sr: str | None = None,
        stored: tuple[bool | None, str | None] = (None, None),
    ) -> schemas.PredictionResponse:
        """The API's answer for one stored prediction (sr: the DICOM SR, base64, when asked for; stored:
        whether the PACS stored it, and why not)."""
        r: Prediction = s.result
        return schemas.PredictionResponse(
            **r.model_dump(exclude={"timing_ms", "cam_png"}),
            timing_ms=timings(r.timing_ms, {"total": (t_end - s.t0) * 1000.0}),
            record_id=row.id,
            filename=s.up.filename,
            image_sha256=s.sha256,
            inputs=schemas.Inputs(**meta),
            cam_png_base64=base64.b64encode(r.cam_png).decode("ascii") if cam and r.cam_png else None,
            dicom_sr_base64=sr,
            sr_stored=stored[0],
            sr_store_error=stored[1],
        )

    async def predict(
        self, up: Upload, age, sex, site, cam: bool, sr: bool = False, store_sr: bool = False
    ) -> schemas.PredictionResponse:
        """Score, then commit the record, then answer: an acknowledged prediction is on disk. store_sr: then
        STOW the SR to the PACS; a PACS failure is stated in the answer (the record stays)."""
        meta = {"age": age, "sex": sex, "site": site}
        dicom = is_dicom_bytes(up.data)
        self._check_sr_request(dicom, sr, store_sr)
        if dicom:  # age/sex/site from the tags where the form leaves them empty
            meta = await anyio.to_thread.run_sync(with_dicom_tags, up, meta)
        scored = await self.score(up, meta, cam)
        built = None
        if (
            sr or store_sr
        ):  # built before the record is committed: a source that cannot make an SR stores nothing
            built = await anyio.to_thread.run_sync(
                dicom_sr, up, scored.result, meta["site"], self.card_sha256
            )
        (row,) = await self.store_all([scored], meta)
        stored = await anyio.to_thread.run_sync(self._stow, built) if store_sr else (None, None)
        sr_b64 = sr_base64(built) if sr else None
        return self.prediction(scored, row, meta, cam, time.perf_counter(), sr_b64, stored)

    def _check_sr_request(self, dicom: bool, sr: bool, store_sr: bool) -> None:
        """dicom_sr/store_sr need a DICOM upload; store_sr needs a PACS (serve --dicomweb)."""
        for flag, name in ((sr, "dicom_sr"), (store_sr, "store_sr")):
            if flag and not dicom:
                raise ApiError(422, f"{name}_needs_dicom", f"{name}=true needs a DICOM upload to reference")
        if store_sr and not self.settings.dicomweb.url:
            raise ApiError(422, "no_pacs", "store_sr=true needs a PACS: start the server with --dicomweb URL")

    def _stow(self, sr: Any) -> tuple[bool, str | None]:
        """STOW-RS the SR (worker thread): (True, None), or (False, the PACS's one-line reason)."""
        from dermlens.errors import DermlensError
        from dermlens.predict.dicomweb import Pacs

        try:
            if self.pacs is None:
                cfg = self.settings.dicomweb
                self.pacs = Pacs(cfg.url, cfg.timeout_s)
            self.pacs.store(sr)
        except DermlensError as e:
            log.warning("DICOM SR not stored: %s", e)
            return False, str(e)
        return True, None

    async def predict_many(
        self, uploads: list[UploadFile], age, sex, site, cam: bool
    ) -> list[schemas.BatchItem]:
        """Each file answers for itself (result or 4xx error); the results are stored together, then sent."""
        meta = {"age": age, "sex": sex, "site": site}
        limit = self.settings.limits.max_upload_bytes
        outcomes: list[Scored | ApiError] = []
        slots = anyio.Semaphore(self.settings.inference.max_concurrent)  # files of this request in memory
        async with anyio.create_task_group() as tg:
            for i, f in enumerate(uploads):  # read a file only when a slot is free; score while reading on
                await slots.acquire()
                outcomes.append(ApiError(500, "internal_error", "not scored"))
                up = Upload(f.filename or None, await f.read(limit + 1), f)
                tg.start_soon(self._score_into, outcomes, i, up, meta, cam, slots)
        scored = [o for o in outcomes if isinstance(o, Scored)]
        rows = iter(await self.store_all(scored, meta))
        t_end = time.perf_counter()
        items = []
        for f, o in zip(uploads, outcomes, strict=True):
            if isinstance(o, Scored):
                items.append(
                    schemas.BatchItem(
                        filename=o.up.filename,
                        ok=True,
                        result=self.prediction(o, next(rows), o.meta or meta, cam, t_end),
                    )
                )
            else:
                items.append(schemas.BatchItem(filename=f.filename or None, ok=False, error=o.body()))
        return items

    async def _score_into(
        self, out: list, i: int, up: Upload, meta: dict[str, Any], cam: bool, slots: anyio.Semaphore
    ) -> None:
        try:
            if is_dicom_bytes(up.data):  # the tags fill the form's gaps, as on /predict
                meta = await anyio.to_thread.run_sync(with_dicom_tags, up, meta)
            out[i] = await self.score(up, meta, cam)
        except ApiError as e:
            out[i] = e
        except Exception:  # noqa: BLE001 - one file's failure is that file's answer, never the batch's 500
            log.exception("unexpected error scoring one file of a batch")
            out[i] = ApiError(500, "internal_error", "this file could not be scored")
        finally:
            up.data, up.dicom = b"", None  # the bytes stay only in the spooled upload (re-read if stored)
            slots.release()

    def fhir_bundle(self, answer: schemas.PredictionResponse, up: Upload) -> dict[str, Any]:
        """The stored prediction as a FHIR R4 Bundle (ImagingStudy referenced for a DICOM upload)."""
        from dermlens.predict.fhir import ModelDevice, build_bundle

        study = None
        if is_dicom_bytes(up.data):
            study = str(getattr(_dicom_call(read_dataset, up.data, False), "StudyInstanceUID", "") or "")
        card = self.predictor.card
        device = ModelDevice.from_bundle(self.predictor.bundle_dir, card.name, card.version)
        return build_bundle(answer, device, record_id=answer.record_id, study_uid=study or None)

    async def attach_outcome(self, record_id: str, body: schemas.OutcomeIn) -> dict[str, Any]:
        """Check and store a confirmed diagnosis: 422 bad value, 404 unknown record, 503 database busy."""
        from dermlens.errors import OutcomeError, UnknownRecord
        from dermlens.serve.outcomes import Outcome, as_dict, attach

        try:
            parsed = Outcome.parse(body.diagnosis, body.method, body.date, body.source)
            row = await anyio.to_thread.run_sync(attach, self.store, record_id, parsed)
        except UnknownRecord as e:
            raise ApiError(404, "unknown_record", str(e)) from None
        except OutcomeError as e:
            raise ApiError(422, "invalid_outcome", str(e)) from None
        except RecordsUnavailable:
            raise busy(
                "the records database is busy; nothing was stored, retry shortly", self.settings
            ) from None
        return as_dict(row)

    def field_performance(self, model_version: str, classes: list[str]) -> dict[str, Any]:
        """Field performance of this model version on the confirmed cases in the records (worker thread)."""
        from dermlens.evaluate.field import field_performance
        from dermlens.serve.outcomes import confirmed_cases

        return field_performance(confirmed_cases(self.store, model_version), classes)

    def model_info(self) -> schemas.ModelInfo:
        card = self.predictor.card
        classes = list(self.predictor.classes)
        lim = self.settings.limits
        return schemas.ModelInfo(
            name=card.name,
            version=card.version,
            architecture=card.architecture,
            precision=self.predictor.precision,
            classes=[
                schemas.ClassInfo(code=c, name=FINE_NAMES.get(c, c), coarse=coarse_label(c)) for c in classes
            ],
            coarse_classes=list(card.coarse_classes),
            uses_metadata=card.uses_metadata,
            sites=list(SITES),
            sexes=list(SEXES),
            auth_required=bool(self.settings.api_token),
            limits=schemas.LimitsInfo(**lim.model_dump()),
            card=card.to_dict(),
            refer=schemas.OperatingPointInfo(
                **describe(self.predictor.trust), requested_refer_rate=self.settings.refer_rate
            ),
            disclaimer=DISCLAIMER,
            dermlens_version=__version__,
        )


async def _stored_bytes(up: Upload) -> bytes:
    """The upload's bytes for the image store (re-read from the spooled file when dropped from memory)."""
    if up.data or up.source is None:
        return up.data
    await up.source.seek(0)
    return await up.source.read()


def open_store(settings: ServeSettings) -> RecordStore:
    """The record store configured in `settings.records` (RecordsConfigError if unusable)."""
    r = settings.records
    return RecordStore(r.url, r.store_images, r.image_dir, r.store_filename, r.lock_timeout_s)


def load_predictor(settings: ServeSettings) -> Any:
    """The runtime Predictor for the configured bundle and precision (imported lazily)."""
    from dermlens.infer.predictor import Predictor

    predictor = Predictor.load(
        bundle_dir=settings.model, precision=settings.precision, threads=settings.inference.threads
    )
    return at_refer_rate(predictor, settings.refer_rate)


async def check_fields(request: Request, allowed: frozenset[str], repeatable: str | None = None) -> None:
    """Refuse unknown form fields and repeated ones (two `file` parts, two `age`s): never guess which wins."""
    keys = [k for k, _ in (await request.form()).multi_items()]
    unknown = sorted(set(keys) - allowed)
    if unknown:
        names = ", ".join(quote(k, 30) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ApiError(
            422, "unknown_field", f"unknown form field(s) {names}; allowed: {', '.join(sorted(allowed))}"
        )
    repeated = sorted({k for k in keys if k != repeatable and keys.count(k) > 1})
    if repeated:
        raise ApiError(
            422,
            "duplicate_field",
            f"form field(s) {', '.join(repeated)} given more than once; send each once",
        )
