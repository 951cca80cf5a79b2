"""FastAPI app: /health, /model, /predict, /predict/batch, and the web page at /.

Every prediction is stored by `records.RecordStore` (committed before the response is sent; nothing is
stored for a prediction that is not returned) and every response that shows a prediction carries the
disclaimer. Errors are JSON: {"error": {"code", "message"}}, bounded and worded here (no input echoed at
length, no library messages). Work in flight is bounded (requests, decoded bytes, the batch queue): when
full, 503 with Retry-After.
"""

import base64
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermlens import DISCLAIMER, __version__
from dermlens.data.taxonomy import FINE_NAMES, SEXES, SITES, coarse_label
from dermlens.dicom import DicomError, is_dicom_bytes, merge_meta, read_dataset, read_meta
from dermlens.preprocess import ImageDecodeError, load_rgb, probe
from dermlens.serve import schemas
from dermlens.serve.batching import DynamicBatcher, QueueFull
from dermlens.serve.inputs import InputError, quote
from dermlens.serve.inputs import parse_age as _parse_age
from dermlens.serve.inputs import parse_sex as _parse_sex
from dermlens.serve.inputs import parse_site as _parse_site
from dermlens.serve.records import NewRecord, RecordStore, RecordsUnavailable
from dermlens.serve.settings import ServeSettings, load_settings, trusted_hosts

log = logging.getLogger("dermlens.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
PREDICT_FIELDS = frozenset({"file", "age", "sex", "site", "cam", "dicom_sr"})
BATCH_FIELDS = frozenset({"files", "age", "sex", "site", "cam"})
_FORM_OVERHEAD = 64 * 1024
MAX_MESSAGE_CHARS, MAX_DETAILS = 300, 10
# ImageDecodeError.code -> (HTTP status, API error code)
_DECODE_ERRORS = {
    "unsupported_format": (400, "not_an_image"),
    "empty_file": (400, "empty_file"),
    "image_too_large": (413, "image_too_large"),
    "corrupt_image": (400, "corrupt_image"),
}
PILLOW_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default MAX_IMAGE_PIXELS
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 413, 422, 503)
}


class ApiError(Exception):
    """An error with an HTTP status and a stable code, rendered as the JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def body(self) -> schemas.ErrorBody:
        return schemas.ErrorBody(code=self.code, message=self.message)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit:,} bytes")


def error_response(
    status: int, code: str, message: str, details: list | None = None, headers=None
) -> JSONResponse:
    """The JSON error body, bounded: message cut to MAX_MESSAGE_CHARS, at most MAX_DETAILS details."""
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
    if details is not None:
        details = [{k: str(v)[:MAX_MESSAGE_CHARS] for k, v in d.items()} for d in details[:MAX_DETAILS]]
    body = schemas.ErrorResponse(error=schemas.ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def busy(message: str, settings: ServeSettings) -> ApiError:
    """503 with Retry-After: the server is saturated or the records database is locked; nothing was stored."""
    return ApiError(503, "unavailable", message, {"Retry-After": str(settings.limits.retry_after_s)})


def cross_origin(headers: dict[str, str], settings: ServeSettings) -> str | None:
    """The Origin of a cross-origin request not in `cors_origins`, else None (same origin or no Origin)."""
    origin = headers.get("origin")
    if origin is None:
        return "cross-site" if headers.get("sec-fetch-site") == "cross-site" else None
    if origin in settings.cors_origins:
        return None
    _, _, authority = origin.partition("://")
    return None if authority and authority == headers.get("host") else origin


class GuardMiddleware:
    """Before any body is read: reject missing/wrong API tokens (401), cross-origin posts (403), oversized
    bodies (413) and requests over the in-flight bound (503)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.in_flight = 0
        lim = settings.limits
        self.limits = {
            "/predict": lim.max_upload_bytes + _FORM_OVERHEAD,
            "/predict/batch": lim.max_batch_files * lim.max_upload_bytes + _FORM_OVERHEAD,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        limit = self.limits.get(path, _FORM_OVERHEAD)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path in self.limits and not token_ok(self.settings.api_token, headers.get("authorization")):
            await _unauthorized()(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and cross_origin(headers, self.settings):
            msg = "cross-origin request refused (add the page's origin to cors_origins to allow it)"
            await error_response(403, "cross_origin", msg)(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await error_response(413, "payload_too_large", f"request body exceeds {limit:,} bytes")(
                scope, receive, send
            )
            return
        if path in self.limits and self.in_flight >= self.settings.limits.max_in_flight:
            err = busy("the server is busy; retry shortly", self.settings)
            await error_response(err.status, err.code, err.message, headers=err.headers)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        counted = path in self.limits
        self.in_flight += counted
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.in_flight -= counted


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """True if no token is configured, or the header is `Bearer <expected>` (constant-time compare)."""
    if not expected:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected.encode())


def _unauthorized() -> JSONResponse:
    return error_response(
        401,
        "unauthorized",
        "missing or invalid API token (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


# ---------------------------------------------------------------------------------------------- inputs


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
        raise ApiError(400, "unsupported_dicom", message) from e


def dicom_sr_payload(up: "Upload", r: Any, card: Any, site: str | None) -> str:
    """The prediction as a DICOM Structured Report referencing the uploaded DICOM image (base64)."""
    from dermlens.serve.dicom_sr import SrPrediction, sr_bytes

    pred = SrPrediction(
        fine=r.fine,
        top=r.top,
        confidence=r.confidence,
        p_malignant=r.p_malignant,
        ood_score=r.ood_score,
        ood=r.ood,
        refer=r.refer,
        refer_reason=r.refer_reason,
        model_name=card.name,
        model_version=r.model_version,
        precision=r.precision,
    )
    source = _dicom_call(read_dataset, up.data, False)
    return base64.b64encode(_dicom_call(sr_bytes, source, pred, site)).decode("ascii")


def decode_error(e: ImageDecodeError) -> ApiError:
    """A decoder failure as this API's own 4xx (the library's message never reaches the client)."""
    status, code = _DECODE_ERRORS.get(getattr(e, "code", ""), (400, "corrupt_image"))
    return ApiError(status, code, getattr(e, "reason", "not a readable image"))


# ---------------------------------------------------------------------------------------------- results


def timings(runtime: dict[str, float], api: dict[str, float]) -> dict[str, float]:
    """The runtime's stage timings (its own total renamed `runtime`) plus the API's (`record`, `total`)."""
    out = {("runtime" if k == "total" else k): float(v) for k, v in runtime.items()}
    return {k: round(v, 3) for k, v in {**out, **api}.items()}


# ---------------------------------------------------------------------------------------------- app


@dataclass
class Upload:
    filename: str | None
    data: bytes
    source: UploadFile | None = None  # the spooled upload, re-read only if images are stored


@dataclass
class Scored:
    """One upload's prediction, not yet stored."""

    up: Upload
    sha256: str
    nbytes: int
    result: Any
    size: tuple[int, int]
    t0: float


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
        self.settings, self.predictor, self.store = settings, predictor, store
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
            need = probe(up.data, lim.max_pixels, lim.max_decoded_bytes).decoded_bytes
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
        r.timing_ms = {"decode": decode_ms, **r.timing_ms}
        return r, size, True

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
            got.timing_ms = {"decode": (t1 - t0) * 1000.0, **got.timing_ms}
        return Scored(up, hashlib.sha256(up.data).hexdigest(), len(up.data), got, size, t0)

    async def store_all(self, scored: list[Scored], meta: dict[str, Any]) -> list[Any]:
        """Commit the records of `scored` in one transaction before anything is answered (503 if locked)."""
        if not scored:
            return []
        images = (
            [await _stored_bytes(s.up) for s in scored] if self.store.store_images else [None] * len(scored)
        )
        news = [self._new_record(s, meta) for s in scored]
        try:
            return await anyio.to_thread.run_sync(self.store.add_many, list(zip(news, images, strict=True)))
        except RecordsUnavailable:
            log.warning("records database unavailable: %d prediction(s) not acknowledged", len(scored))
            raise busy(
                "the records database is busy; nothing was stored, retry shortly", self.settings
            ) from None

    def _new_record(self, s: Scored, meta: dict[str, Any]) -> NewRecord:
        r = s.result
        return NewRecord(
            image_sha256=s.sha256,
            image_bytes=s.nbytes,
            filename=s.up.filename,
            **meta,
            model_name=self.predictor.card.name,
            model_version=r.model_version,
            fine_probs=r.fine,
            coarse_probs=r.coarse,
            top_class=r.top,
            confidence=r.confidence,
            ood_score=r.ood_score,
            ood=r.ood,
            refer=r.refer,
            refer_reason=r.refer_reason,
            latency_ms=round((time.perf_counter() - s.t0) * 1000.0, 3),
            image_width=s.size[0],
            image_height=s.size[1],
        )

    def prediction(
        self, s: Scored, row: Any, meta: dict[str, Any], cam: bool, t_end: float
    ) -> schemas.Prediction:
        r = s.result
        return schemas.Prediction(
            record_id=row.id,
            filename=s.up.filename,
            image_sha256=s.sha256,
            inputs=schemas.Inputs(**meta),
            fine=r.fine,
            coarse=r.coarse,
            top_class=r.top,
            top_class_name=FINE_NAMES.get(r.top, r.top),
            confidence=r.confidence,
            ood=schemas.OODInfo(score=r.ood_score, flagged=r.ood),
            refer=schemas.ReferInfo(refer=r.refer, reason=r.refer_reason, codes=r.refer_codes),
            prediction_set=None
            if r.prediction_set is None
            else schemas.PredictionSetInfo(
                classes=r.prediction_set, coverage=r.set_coverage, condition=r.calibration_condition
            ),
            not_dermoscopy=schemas.NotDermoscopyInfo(score=r.not_dermoscopy_score, flagged=r.not_dermoscopy),
            model_name=self.predictor.card.name,
            model_version=r.model_version,
            precision=r.precision,
            timing_ms=timings(r.timing_ms, {"total": (t_end - s.t0) * 1000.0}),
            cam_png_base64=base64.b64encode(r.cam_png).decode("ascii") if cam and r.cam_png else None,
            disclaimer=DISCLAIMER,
        )

    async def predict(self, up: Upload, age, sex, site, cam: bool, sr: bool = False) -> schemas.Prediction:
        """Score, then commit the record, then answer: an acknowledged prediction is on disk."""
        meta = {"age": age, "sex": sex, "site": site}
        dicom = is_dicom_bytes(up.data)
        if sr and not dicom:
            raise ApiError(422, "dicom_sr_needs_dicom", "dicom_sr=true needs a DICOM upload to reference")
        if dicom:  # age/sex/site from the tags where the form leaves them empty
            meta = await anyio.to_thread.run_sync(lambda: merge_meta(meta, _dicom_call(read_meta, up.data)))
        scored = await self.score(up, meta, cam)
        (row,) = await self.store_all([scored], meta)
        out = self.prediction(scored, row, meta, cam, time.perf_counter())
        if sr:
            card = self.predictor.card
            out.dicom_sr_base64 = await anyio.to_thread.run_sync(
                dicom_sr_payload, up, scored.result, card, meta["site"]
            )
        return out

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
                        result=self.prediction(o, next(rows), meta, cam, t_end),
                    )
                )
            else:
                items.append(schemas.BatchItem(filename=f.filename or None, ok=False, error=o.body()))
        return items

    async def _score_into(
        self, out: list, i: int, up: Upload, meta: dict[str, Any], cam: bool, slots: anyio.Semaphore
    ) -> None:
        try:
            out[i] = await self.score(up, meta, cam)
        except ApiError as e:
            out[i] = e
        except Exception:  # noqa: BLE001 - one file's failure is that file's answer, never the batch's 500
            log.exception("unexpected error scoring one file of a batch")
            out[i] = ApiError(500, "internal_error", "this file could not be scored")
        finally:
            up.data = b""  # the bytes stay only in the spooled upload (re-read if images are stored)
            slots.release()

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

    return Predictor.load(
        bundle_dir=settings.model, precision=settings.precision, threads=settings.inference.threads
    )


async def _check_fields(request: Request, allowed: frozenset[str], repeatable: str | None = None) -> None:
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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d['loc'][1:]) or 'request'}: {d['msg']}" for d in details)
        return error_response(422, "validation_error", summary or "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")


def create_app(
    settings: ServeSettings | None = None, predictor: Any = None, store: RecordStore | None = None
) -> FastAPI:
    """The dermlens app. Loads the Predictor and opens the record store at startup unless given."""
    settings = settings or load_settings()
    # Uploads are checked against limits.max_pixels from the header (image_header); Pillow's own bomb
    # check stays on as a second guard (restored if something disabled it). Never lowered: it is global.
    if Image.MAX_IMAGE_PIXELS is None:
        Image.MAX_IMAGE_PIXELS = PILLOW_MAX_PIXELS
    state: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pred = predictor if predictor is not None else await run_in_threadpool(load_predictor, settings)
        st = store or open_store(settings)
        state["service"] = svc = Service(settings, pred, st)
        log.info("dermlens: model %s %s; records in %s", pred.card.name, pred.card.version, st.describe())
        try:
            yield
        finally:
            svc.close()
            if store is None:
                st.close()

    app = FastAPI(
        title="dermlens",
        version=__version__,
        description=f"Dermoscopic skin-lesion classification API.\n\n**{DISCLAIMER}**",
        lifespan=lifespan,
    )
    app.add_middleware(GuardMiddleware, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings))
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="Needed only when the server sets an API token")

    async def service() -> Service:
        if "service" not in state:
            raise ApiError(503, "model_unavailable", "the model is not loaded")
        return state["service"]

    async def authorize(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        header = f"{cred.scheme} {cred.credentials}" if cred else None
        if not token_ok(settings.api_token, header):
            raise ApiError(
                401, "unauthorized", "missing or invalid API token (Authorization: Bearer <token>)"
            )

    Svc = Annotated[Service, Depends(service)]
    auth = [Depends(authorize)]
    AgeF = Annotated[str | None, Form(description="Age in years, 0-120 (optional)")]
    SexF = Annotated[str | None, Form(description="female or male (optional)")]
    SiteF = Annotated[str | None, Form(description="Anatomic site, one of GET /model `sites` (optional)")]
    CamF = Annotated[bool, Form(description="Also return the class activation map overlay (PNG, base64)")]

    @app.get("/health", response_model=schemas.Health, tags=["service"])
    def health() -> schemas.Health:
        svc = state.get("service")
        return schemas.Health(
            model_loaded=svc is not None,
            model_version=svc.predictor.card.version if svc else None,
            dermlens_version=__version__,
        )

    @app.get("/model", response_model=schemas.ModelInfo, tags=["service"])
    def model(svc: Svc) -> schemas.ModelInfo:
        return svc.model_info()

    @app.post(
        "/predict",
        response_model=schemas.Prediction,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        tags=["predict"],
    )
    async def predict(
        request: Request,
        svc: Svc,
        file: Annotated[
            UploadFile, File(description="The dermoscopic image (JPEG, PNG, BMP, TIFF, WebP, DICOM)")
        ],
        age: AgeF = None,
        sex: SexF = None,
        site: SiteF = None,
        cam: CamF = False,
        dicom_sr: Annotated[
            bool, Form(description="DICOM uploads: also return a DICOM Structured Report (base64)")
        ] = False,
    ) -> schemas.Prediction:
        await _check_fields(request, PREDICT_FIELDS)
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        up = Upload(file.filename or None, await file.read(settings.limits.max_upload_bytes + 1), file)
        return await svc.predict(up, a, s, g, cam, dicom_sr)

    @app.post(
        "/predict/batch",
        response_model=schemas.BatchResponse,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        tags=["predict"],
    )
    async def predict_batch(
        request: Request,
        svc: Svc,
        files: Annotated[
            list[UploadFile], File(description="Several images; each gets a result or an error")
        ],
        age: AgeF = None,
        sex: SexF = None,
        site: SiteF = None,
        cam: CamF = False,
    ) -> schemas.BatchResponse:
        """The same age/sex/site apply to every file (send one request per patient)."""
        await _check_fields(request, BATCH_FIELDS, repeatable="files")
        if len(files) > settings.limits.max_batch_files:
            raise ApiError(
                413, "too_many_files", f"at most {settings.limits.max_batch_files} files per batch"
            )
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        items = await svc.predict_many(files, a, s, g, cam)
        return schemas.BatchResponse(results=items, disclaimer=DISCLAIMER)

    @app.get("/monitor", dependencies=auth, responses=ERROR_RESPONSES, tags=["service"])
    async def monitor(
        svc: Svc, last: int | None = None, since: str | None = None, format: str = "html"
    ) -> Any:
        """Drift of the stored predictions vs the model's reference (as `dermlens monitor`): HTML or JSON."""
        try:
            import matplotlib  # noqa: F401
            import scipy  # noqa: F401

            from dermlens.monitor.page import monitor_view
            from dermlens.monitor.reference import MissingReference
        except ImportError as e:
            raise ApiError(503, "unavailable", "monitoring needs `pip install 'dermlens[monitor]'`") from e
        try:
            view = await run_in_threadpool(
                monitor_view, svc.store, svc.predictor.bundle_dir, last, since, format == "json"
            )
        except (MissingReference, ValueError) as e:
            raise ApiError(400 if isinstance(e, ValueError) else 503, "monitor_error", str(e)) from e
        if format == "json":
            return JSONResponse(view)
        return HTMLResponse(view, headers=_MONITOR_HEADERS)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# The page loads nothing from outside this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# The monitor report is one self-contained page: inline style, plots as data: URIs, no script.
_MONITOR_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
