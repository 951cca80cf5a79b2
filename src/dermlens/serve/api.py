"""FastAPI app: /health, /model, /predict, /predict/batch, and the web page at /.

Every prediction is stored by `records.RecordStore` (committed before the response is sent; nothing is
stored for a prediction that is not returned) and every response that shows a prediction carries the
disclaimer. Errors are JSON: {"error": {"code", "message"}}, bounded and worded here (no input echoed at
length, no library messages). Work in flight is bounded (requests, decoded bytes, the batch queue): when
full, 503 with Retry-After.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dermlens import DISCLAIMER, __version__
from dermlens.extras import MissingExtra, require
from dermlens.predict.fhir import MEDIA_TYPE as FHIR_MEDIA_TYPE
from dermlens.serve import schemas
from dermlens.serve.errors import PILLOW_MAX_PIXELS, ApiError, install_error_handlers
from dermlens.serve.records import RecordStore
from dermlens.serve.security import GuardMiddleware, token_ok
from dermlens.serve.service import (
    BATCH_FIELDS,
    PREDICT_FIELDS,
    Service,
    Upload,
    check_fields,
    load_predictor,
    open_store,
    parse_age,
    parse_sex,
    parse_site,
)
from dermlens.serve.settings import ServeSettings, load_settings, trusted_hosts

log = logging.getLogger("dermlens.serve")


STATIC_DIR = Path(__file__).resolve().parent / "static"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 413, 422, 503)
}


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
    install_error_handlers(app)
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

    @app.get("/health", response_model=schemas.Health, tags=["service"], responses={503: {}})
    async def health() -> JSONResponse:
        """Cheap and on the event loop (never queued behind a hung database): 503 while degraded."""
        svc = state.get("service")
        records_ok = svc is None or svc.store.available()
        body = schemas.Health(
            status="ok" if records_ok else "degraded",
            records="ok" if records_ok else "unavailable",
            model_loaded=svc is not None,
            model_version=svc.predictor.card.version if svc else None,
            dermlens_version=__version__,
        )
        retry = {"Retry-After": str(settings.limits.retry_after_s)}
        return JSONResponse(body.model_dump(), 200 if records_ok else 503, None if records_ok else retry)

    @app.get("/model", response_model=schemas.ModelInfo, tags=["service"])
    def model(svc: Svc) -> schemas.ModelInfo:
        return svc.model_info()

    @app.post(
        "/predict",
        response_model=schemas.PredictionResponse,
        dependencies=auth,
        responses={**ERROR_RESPONSES, 406: {"model": schemas.ErrorResponse}, **FHIR_RESPONSE},
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
        store_sr: Annotated[
            bool, Form(description="DICOM uploads: store the DICOM SR in the server's PACS (STOW-RS)")
        ] = False,
        format: Annotated[
            Literal["json", "fhir"] | None,
            Query(description="fhir: answer with a FHIR R4 Bundle (as does Accept: application/fhir+json)"),
        ] = None,
    ) -> Any:
        await check_fields(request, PREDICT_FIELDS)
        fhir = wants_fhir(format, request.headers.get("accept"))
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        up = Upload(file.filename or None, await file.read(settings.limits.max_upload_bytes + 1), file)
        answer = await svc.predict(up, a, s, g, cam, dicom_sr, store_sr)
        if not fhir:
            return answer
        bundle = await run_in_threadpool(svc.fhir_bundle, answer, up)
        return JSONResponse(bundle, media_type=FHIR_MEDIA_TYPE)

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
        await check_fields(request, BATCH_FIELDS, repeatable="files")
        if len(files) > settings.limits.max_batch_files:
            raise ApiError(
                413, "too_many_files", f"at most {settings.limits.max_batch_files} files per batch"
            )
        a, s, g = parse_age(age), parse_sex(sex), parse_site(site)
        items = await svc.predict_many(files, a, s, g, cam)
        return schemas.BatchResponse(results=items, disclaimer=DISCLAIMER)

    @app.post(
        "/records/{record_id}/outcome",
        status_code=201,
        response_model=schemas.OutcomeResponse,
        dependencies=auth,
        responses={**ERROR_RESPONSES, 404: {"model": schemas.ErrorResponse}},
        tags=["records"],
    )
    async def outcome(record_id: str, body: schemas.OutcomeIn, svc: Svc) -> schemas.OutcomeResponse:
        """Attach a confirmed diagnosis (histopathology, follow-up, ...) to a stored prediction."""
        return schemas.OutcomeResponse(**await svc.attach_outcome(record_id, body))

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
                monitor_view,
                svc.store,
                svc.predictor.bundle_dir,
                last,
                since,
                format == "json",
                svc.field_performance,
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


FHIR_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_MEDIA_TYPE: {"schema": {"type": "object", "description": "FHIR R4 Bundle"}}}}
}


def wants_fhir(format: str | None, accept: str | None) -> bool:
    """FHIR asked for (?format=fhir, or Accept names application/fhir+json); 406 if it cannot be made."""
    asked = format == "fhir" or (format is None and FHIR_MEDIA_TYPE in (accept or "").lower())
    if asked:
        try:
            require("fhir.resources.R4B", "fhir")
        except MissingExtra as e:
            raise ApiError(406, "fhir_unavailable", str(e)) from None
    return asked


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
