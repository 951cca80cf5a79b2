"""`dermlens serve`: the web page and HTTP API on one port (uvicorn). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dermlens.cli.options import ReferRate
from dermlens.errors import ConfigError, DermlensError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_blas() -> None:
    """One BLAS thread per request unless the user says otherwise (must run before numpy is imported).

    Requests already run in parallel; a multi-threaded BLAS in the trust layer's numpy math fights
    onnxruntime and the other requests for the cores (measured on 2 shared cores: 56 ms -> 9 ms/image).
    """
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default from serve.yaml: 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one)")] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model bundle folder (default: the release bundle)")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 or int8")] = None,
    refer_rate: ReferRate = None,
    config: Annotated[Path | None, typer.Option(help="YAML file overriding configs/serve.yaml")] = None,
    records_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL for prediction records")] = None,
    allow_insecure_bind: Annotated[
        bool,
        typer.Option(
            "--allow-insecure-bind", help="Serve a non-loopback address without an API token (not advised)"
        ),
    ] = False,
    dicomweb: Annotated[
        str | None,
        typer.Option(
            "--dicomweb",
            help="DICOMweb URL of a PACS: store_sr=true on a DICOM upload stores its SR there (STOW-RS)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the web page at / and the API (/predict, /predict/batch, /model, /health, /docs)."""
    single_threaded_blas()
    from dermlens import DISCLAIMER

    settings, predictor, store = _start(
        config,
        host=host,
        port=port,
        model=str(model) if model else None,
        precision=precision,
        refer_rate=refer_rate,
        records={"url": records_url} if records_url else None,
        allow_insecure_bind=allow_insecure_bind or None,
        dicomweb={"url": dicomweb} if dicomweb else None,
    )
    import uvicorn

    from dermlens.serve.api import create_app
    from dermlens.serve.http import uvicorn_config

    typer.echo(DISCLAIMER, err=True)
    try:
        uvicorn.Server(uvicorn_config(create_app(settings, predictor, store), settings, log_level)).run()
    finally:
        store.close()


def _fail(message: str) -> DermlensError:
    """A one-line start-up error that cli/main.py prints (exit 2)."""
    return ConfigError(message)


def _start(config: Path | None, **overrides):
    """Settings, model and record store, each checked before uvicorn starts: one-line errors, exit 2."""
    import yaml
    from pydantic import ValidationError

    from dermlens.bundle import BundleError
    from dermlens.serve.records import RecordsConfigError
    from dermlens.serve.service import load_predictor, open_store
    from dermlens.serve.settings import is_loopback, load_settings

    try:
        settings = load_settings(config, **overrides)
    except (OSError, yaml.YAMLError, ValueError) as e:
        msg = (
            f"{len(e.errors())} invalid setting(s), first: {e.errors()[0]['loc']}"
            if isinstance(e, ValidationError)
            else str(e).splitlines()[0]
        )
        raise _fail(f"configuration: {msg}") from None
    if not is_loopback(settings.host) and not settings.api_token and not settings.allow_insecure_bind:
        raise _fail(
            f"refusing to serve on {settings.host} without an API token: set DERMLENS_API_TOKEN "
            "(or pass --allow-insecure-bind if a firewall or proxy protects this port)"
        )
    try:
        predictor = load_predictor(settings)
    except (BundleError, OSError, ValueError) as e:
        raise _fail(f"model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        store = open_store(settings)
    except RecordsConfigError as e:
        raise _fail(str(e)) from None
    return settings, predictor, store


if __name__ == "__main__":
    app()
