"""FastAPI app: /health, /model, /predict, /predict/batch, and the web page at /.

Every prediction is stored by `records.RecordStore` (committed before the response is sent) and every
response that shows a prediction carries the disclaimer. Errors are JSON: {"error": {"code", "message"}}.
"""

import base64
import hashlib
import hmac
import io
import logging
import math
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
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermlens import DISCLAIMER, __version__
from dermlens.data.taxonomy import FINE_NAMES, SEXES, SITES, coarse_label, sex_value, site_general
from dermlens.preprocess import ImageDecodeError
from dermlens.serve import schemas
from dermlens.serve.records import NewRecord, RecordStore
from dermlens.serve.settings import ServeSettings, load_settings

log = logging.getLogger("dermlens.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
PREDICT_FIELDS = frozenset({"file", "age", "sex", "site", "cam"})
BATCH_FIELDS = frozenset({"files", "age", "sex", "site", "cam"})
_MISSING = {"", "unknown", "none", "null", "nan", "n/a", "na"}
_FORM_OVERHEAD = 64 * 1024
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

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> schemas.ErrorBody:
        return schemas.ErrorBody(code=self.code, message=self.message)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit:,} bytes")


def error_response(
    status: int, code: str, message: str, details: list | None = None, headers=None
) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


class GuardMiddleware:
    """Before any body is read: reject missing/wrong API tokens (401) and oversized bodies (413)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings
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
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await error_response(413, "payload_too_large", f"request body exceeds {limit:,} bytes")(
                scope, receive, send
            )
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

        await self.app(scope, limited_receive, send)


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


def parse_age(value: str | None) -> float | None:
    """Age in years (0-120) or None; anything else is a 422."""
    if value is None or value.strip().lower() in _MISSING:
        return None
    try:
        age = float(value)
    except ValueError:
        raise ApiError(422, "invalid_age", f"age must be a number of years, got {value!r}") from None
    if not math.isfinite(age) or not 0 <= age <= 120:
        raise ApiError(422, "invalid_age", f"age must be between 0 and 120, got {value!r}")
    return age


def parse_sex(value: str | None) -> str | None:
    if value is None or value.strip().lower() in _MISSING:
        return None
    sex = sex_value(value)
    if sex is None:
        raise ApiError(422, "invalid_sex", f"sex must be one of {', '.join(SEXES)} (or empty), got {value!r}")
    return sex


def parse_site(value: str | None) -> str | None:
    if value is None or value.strip().lower() in _MISSING:
        return None
    site = site_general(value)
    if site is None:
        raise ApiError(
            422, "invalid_site", f"site must be one of {', '.join(SITES)} (or empty), got {value!r}"
        )
    return site


def image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels; rejects non-images and bombs."""
    if not data:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"image exceeds the pixel limit ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(
            400, "not_an_image", f"the file is not a readable image ({e.__class__.__name__})"
        ) from e
    if width * height > max_pixels:
        raise ApiError(
            413, "image_too_large", f"{width}x{height} image exceeds the {max_pixels:,}-pixel limit"
        )
    return width, height


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


class Service:
    """The loaded model, the record store and the concurrency limit shared by all requests."""

    def __init__(self, settings: ServeSettings, predictor: Any, store: RecordStore):
        self.settings, self.predictor, self.store = settings, predictor, store
        self.limiter = anyio.CapacityLimiter(settings.inference.max_concurrent)

    def _infer(self, up: Upload, meta: dict[str, Any], cam: bool) -> tuple[Any, int, int]:
        """Check and score one image (worker thread, under the inference limiter)."""
        lim = self.settings.limits
        if len(up.data) > lim.max_upload_bytes:
            raise ApiError(413, "file_too_large", f"file exceeds the {lim.max_upload_bytes:,}-byte limit")
        width, height = image_header(up.data, lim.max_pixels)
        try:
            r = self.predictor.predict_bytes(up.data, meta, cam, max_pixels=lim.max_pixels)
        except ImageDecodeError as e:
            raise ApiError(400, "corrupt_image", str(e).replace("<upload>: ", "", 1)) from e
        return r, width, height

    def _record(self, up: Upload, meta: dict[str, Any], r: Any, size: tuple[int, int], t0: float) -> Any:
        """Durably store the prediction (worker thread, outside the limiter: the disk flush uses no CPU)."""
        row = self.store.add(
            NewRecord(
                image_sha256=hashlib.sha256(up.data).hexdigest(),
                image_bytes=len(up.data),
                filename=up.filename,
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
                latency_ms=round((time.perf_counter() - t0) * 1000.0, 3),
                image_width=size[0],
                image_height=size[1],
            ),
            image=up.data,
        )
        return row

    async def predict(self, up: Upload, age, sex, site, cam: bool) -> schemas.Prediction:
        """Score, then commit the record, then answer: an acknowledged prediction is on disk."""
        t0 = time.perf_counter()
        meta = {"age": age, "sex": sex, "site": site}
        r, width, height = await anyio.to_thread.run_sync(self._infer, up, meta, cam, limiter=self.limiter)
        t1 = time.perf_counter()
        row = await anyio.to_thread.run_sync(self._record, up, meta, r, (width, height), t0)
        t2 = time.perf_counter()
        return schemas.Prediction(
            record_id=row.id,
            filename=up.filename,
            image_sha256=row.image_sha256,
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
            timing_ms=timings(r.timing_ms, {"record": (t2 - t1) * 1000.0, "total": (t2 - t0) * 1000.0}),
            cam_png_base64=base64.b64encode(r.cam_png).decode("ascii") if cam and r.cam_png else None,
            disclaimer=DISCLAIMER,
        )

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


def load_predictor(settings: ServeSettings) -> Any:
    """The runtime Predictor for the configured bundle and precision (imported lazily)."""
    from dermlens.serve.runtime import Predictor

    return Predictor.load(
        bundle_dir=settings.model, precision=settings.precision, threads=settings.inference.threads
    )


async def _read_uploads(files: list[UploadFile], limit: int) -> list[Upload]:
    """Read uploaded files, at most limit+1 bytes each (the size check happens per file later)."""
    return [Upload(f.filename or None, await f.read(limit + 1)) for f in files]


async def _check_fields(request: Request, allowed: frozenset[str]) -> None:
    unknown = sorted(set((await request.form()).keys()) - allowed)
    if unknown:
        raise ApiError(
            422,
            "unknown_field",
            f"unknown form field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
        )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

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
        st = store or RecordStore(
            settings.records.url, settings.records.store_images, settings.records.image_dir
        )
        state["service"] = Service(settings, pred, st)
        log.info("dermlens: model %s %s; records in %s", pred.card.name, pred.card.version, st.describe())
        try:
            yield
        finally:
            if store is None:
                st.close()

    app = FastAPI(
        title="dermlens",
        version=__version__,
        description=f"Dermoscopic skin-lesion classification API.\n\n**{DISCLAIMER}**",
        lifespan=lifespan,
    )
    app.add_middleware(GuardMiddleware, settings=settings)
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
        file: Annotated[UploadFile, File(description="The dermoscopic image (JPEG, PNG, BMP, TIFF, WebP)")],
        age: AgeF = None,
        sex: SexF = None,
        site: SiteF = None,
        cam: CamF = False,
    ) -> schemas.Prediction:
        await _check_fields(request, PREDICT_FIELDS)
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        (up,) = await _read_uploads([file], settings.limits.max_upload_bytes)
        return await svc.predict(up, a, s, g, cam)

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
        await _check_fields(request, BATCH_FIELDS)
        if len(files) > settings.limits.max_batch_files:
            raise ApiError(
                413, "too_many_files", f"at most {settings.limits.max_batch_files} files per batch"
            )
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        items = []
        for up in await _read_uploads(files, settings.limits.max_upload_bytes):
            try:
                items.append(
                    schemas.BatchItem(
                        filename=up.filename, ok=True, result=await svc.predict(up, a, s, g, cam)
                    )
                )
            except ApiError as e:
                items.append(schemas.BatchItem(filename=up.filename, ok=False, error=e.body()))
        return schemas.BatchResponse(results=items, disclaimer=DISCLAIMER)

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


class BackgroundServer:
    """Run an app under uvicorn in a daemon thread on a free loopback port (tests, notebooks, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="dermlens-server", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dermlens server did not start")
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
