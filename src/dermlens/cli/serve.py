"""`dermlens serve`: the web page and HTTP API on one port (uvicorn). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

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
    config: Annotated[Path | None, typer.Option(help="YAML file overriding configs/serve.yaml")] = None,
    records_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL for prediction records")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the web page at / and the API (/predict, /predict/batch, /model, /health, /docs)."""
    single_threaded_blas()
    import uvicorn

    from dermlens import DISCLAIMER
    from dermlens.serve.api import create_app
    from dermlens.serve.settings import load_settings

    settings = load_settings(
        config,
        host=host,
        port=port,
        model=str(model) if model else None,
        precision=precision,
        records={"url": records_url} if records_url else None,
    )
    typer.echo(DISCLAIMER, err=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
        typer.echo(
            f"warning: serving on {settings.host} without an API token (set DERMLENS_API_TOKEN)", err=True
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


if __name__ == "__main__":
    app()
