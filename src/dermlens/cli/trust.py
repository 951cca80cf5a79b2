"""`dermlens trust fit` (re)fits calibration per condition, conformal sets and the not-dermoscopy head on an
existing bundle; `dermlens trust probe` measures the not-dermoscopy refusal on the proxy probe.

Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Trust statistics of a model bundle: fit and measure.", no_args_is_help=True)


def _write(out: Path | None, report: dict) -> None:
    if out is None:
        return
    from dermlens.evaluate import json_safe

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    typer.echo(f"wrote {out}", err=True)


@app.command("fit")
def fit(
    bundle: Annotated[Path, typer.Option("--bundle", help="model bundle folder (rewritten in place)")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of configs/trust.yaml, e.g. conformal.alpha=0.05"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding configs/trust.yaml")
    ] = None,
    manifest: Annotated[
        Path, typer.Option("--manifest", help="prepared HAM10000 folder (val: calibration; train: head)")
    ] = Path("work/ham10000"),
    external: Annotated[
        Path | None,
        typer.Option(
            "--external", help="prepared external folder (e.g. work/isic2017); its TRAIN split only"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the fit report JSON here")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime threads (0 = all cores)")] = 0,
) -> None:
    """Fit calibration per condition (with/without metadata), Mondrian conformal thresholds, the
    not-dermoscopy head and the refer thresholds into BUNDLE/trust.npz and card.json (a few minutes)."""
    from dermlens.bundle import BundleError
    from dermlens.data.manifest import DataError
    from dermlens.settings import cpu_name
    from dermlens.trust.outputs import trust_config
    from dermlens.trust.shift import RefitError, refit_bundle

    try:
        cfg = trust_config(config, overrides)
        report = refit_bundle(
            bundle, manifest, external, cfg, threads=threads or None, log=lambda m: typer.echo(m, err=True)
        )
    except (RefitError, BundleError, DataError, FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    report["cpu"] = cpu_name()
    _write(out, report)
    cal = report["calibration"]
    typer.echo(
        f"calibration {cal['chosen']}; conformal alpha {report['conformal']['alpha']}; "
        f"val refer rate {report['refer']['val_rates']['refer']:.3f}"
    )


@app.command("probe")
def probe(
    bundle: Annotated[Path | None, typer.Option("--bundle", help="model bundle (default: packaged)")] = None,
    manifest: Annotated[Path, typer.Option("--manifest", help="prepared HAM10000 folder")] = Path(
        "work/ham10000"
    ),
    external: Annotated[
        Path | None, typer.Option("--external", help="prepared external dermoscopy folder (its test split)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the probe JSON here")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime threads (0 = all cores)")] = 0,
) -> None:
    """Not-dermoscopy refusal on the PROXY probe: near-OOD AUROC and the in-distribution refusal rate."""
    from dermlens.bundle import BundleError, release_dir
    from dermlens.data.manifest import DataError
    from dermlens.trust.proxy_probe import measure_not_dermoscopy
    from dermlens.trust.shift import RefitError

    try:
        res = measure_not_dermoscopy(
            bundle or release_dir(),
            manifest,
            external,
            threads=threads or None,
            log=lambda m: typer.echo(m, err=True),
        )
    except (RefitError, BundleError, DataError, FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    _write(out, res)
    ind = res["in_distribution_test"]
    typer.echo(
        f"near-OOD AUROC (proxy) {res['near_ood_auroc_not_dermoscopy']:.3f}; in-distribution test refused "
        f"as not dermoscopy {ind['refused_not_dermoscopy']:.3%} "
        f"(by OOD or not dermoscopy {ind['refused_either']:.3%})"
    )


@app.command("refit")
def refit(
    out: Annotated[
        Path, typer.Option("--out", help="NEW bundle folder to write (must not exist or be empty)")
    ],
    from_records: Annotated[
        bool,
        typer.Option("--from-records", help="refit on the confirmed outcomes in the records database"),
    ] = False,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="bundle whose records are used (default: packaged)")
    ] = None,
    records_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL of the records (default: as `dermlens serve`)")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of configs/trust.yaml, e.g. from_records.min_cases=300"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding configs/trust.yaml")
    ] = None,
) -> None:
    """Refit temperatures and conformal thresholds from confirmed outcomes into a NEW bundle (new version)."""
    from dermlens.bundle import read_card, release_dir
    from dermlens.errors import RefitError
    from dermlens.evaluate.field import case_arrays
    from dermlens.serve.outcomes import confirmed_cases
    from dermlens.serve.records import RecordStore
    from dermlens.serve.settings import load_settings
    from dermlens.trust.outputs import trust_config
    from dermlens.trust.records_refit import ConfirmedArrays, refit_from_records

    if not from_records:
        raise RefitError("give --from-records (the only source of a refit from outcomes)")
    source = bundle or release_dir()
    card = read_card(source)
    cfg = trust_config(config, overrides)
    store = RecordStore(records_url or load_settings().records.url)
    try:
        cases = confirmed_cases(store, card.version)
    finally:
        store.close()
    probs, labels, kept = case_arrays(cases, card.classes)
    provenance = {
        "database": store.describe(),
        "model_version": card.version,
        "records_from": kept["created_at"].min().isoformat() if len(kept) else None,
        "records_to": kept["created_at"].max().isoformat() if len(kept) else None,
        "confirmed_from": str(kept["confirmed_on"].min()) if len(kept) else None,
        "confirmed_to": str(kept["confirmed_on"].max()) if len(kept) else None,
    }
    arrays = ConfirmedArrays(probs, kept["p_malignant"].to_numpy(float), labels)
    report = refit_from_records(source, out, arrays, provenance, cfg)
    typer.echo(
        f"wrote {out}: version {report['version']} from {report['n_cases']} confirmed cases "
        f"({provenance['confirmed_from']} to {provenance['confirmed_to']}); temperature x "
        f"{report['temperature_scale_fine']:.3f} (coarse x {report['temperature_scale_coarse']:.3f}); "
        f"conformal thresholds refitted for {', '.join(report['conformal_refitted_classes'])}"
    )


@app.command("operating-point")
def operating_point(
    bundle: Annotated[Path, typer.Option("--bundle", help="model bundle folder (rewritten in place)")],
    manifest: Annotated[
        Path, typer.Option("--manifest", help="prepared HAM10000 folder (its val split is used)")
    ] = Path("work/ham10000"),
    accept_rate: Annotated[
        float | None,
        typer.Option(
            "--accept-rate",
            min=0.0,
            max=1.0,
            help="share of val images accepted by all four refer flags (default: trust.yaml)",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="use this many val images")] = None,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="also score val and test with bootstrap CIs")
    ] = False,
    n_bootstrap: Annotated[int, typer.Option("--n-bootstrap", min=1, help="bootstrap resamples")] = 1000,
    out: Annotated[Path | None, typer.Option("--out", help="write the report JSON here")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime threads (0 = all cores)")] = 0,
) -> None:
    """Write the refer operating point into BUNDLE: min_confidence for the accept rate on val, and the val
    confidence quantiles that map a user's --refer-rate to a threshold at run time."""
    from dermlens.settings import cpu_name
    from dermlens.trust.operating_point import measure_point, write_operating_point

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    report = write_operating_point(
        bundle, manifest, accept_rate, threads=threads or None, limit=limit, log=log
    )
    if measure:
        report["measured"] = measure_point(
            bundle, manifest, n_resamples=n_bootstrap, threads=threads or None, log=log
        )
    report["cpu"] = cpu_name()
    _write(out, report)
    v = report["val"]
    typer.echo(
        f"accept rate {report['accept_rate']:.2f}: min_confidence {report['min_confidence']:.4f}; val refer "
        f"rate {v['refer_rate']:.3f}, balanced accuracy of accepted {v['balanced_accuracy_accepted']:.3f}"
    )


Threads = Annotated[int, typer.Option(help="onnxruntime threads (0 = all cores)")]
Limit = Annotated[
    int | None, typer.Option("--limit", help="at most this many images per source and split (a quick check)")
]
Config = Annotated[Path | None, typer.Option("--config", help="YAML overriding configs/trust.yaml")]
MeasuredBundle = Annotated[Path | None, typer.Option("--bundle", help="model bundle (default: packaged)")]
FiguresOut = Annotated[Path | None, typer.Option("--out", help="write the figures JSON here")]


@app.command("fit-sources")
def fit_sources_cmd(
    bundle: Annotated[Path, typer.Option("--bundle", help="model bundle folder (rewritten in place)")],
    config: Config = None,
    out: Annotated[Path | None, typer.Option("--out", help="also write the fit report JSON here")] = None,
    threads: Threads = 0,
) -> None:
    """Fit calibration and conformal thresholds on the pooled val splits of every dermoscopy source in
    configs/trust.yaml `sources`, and the not-dermoscopy head on real PAD-UFES-20 photos (train patients;
    threshold on val), into BUNDLE/trust.npz and card.json; then run `trust operating-point`."""
    from dermlens.settings import cpu_name
    from dermlens.trust.outputs import trust_config
    from dermlens.trust.per_source import fit_sources

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    report = fit_sources(bundle, trust_config(config), threads or None, log)
    _write(out, {**report, "cpu": cpu_name()})
    chosen = report["not_dermoscopy"]["chosen"]
    f = report["not_dermoscopy"]["val"][chosen]
    typer.echo(
        f"calibration {report['calibration']['chosen']}; not-dermoscopy head {chosen}: PAD val refused "
        f"{f['photo_refusal']:.3f}, worst dermoscopy val false refusal {max(f['false_refusal'].values()):.3f}"
    )


@app.command("measure-not-dermoscopy")
def measure_not_dermoscopy_cmd(
    bundle: MeasuredBundle = None,
    config: Config = None,
    out: FiguresOut = None,
    limit: Limit = None,
    threads: Threads = 0,
) -> None:
    """The not-dermoscopy refusal on real photos: PAD-UFES-20 val/test refused, each dermoscopy source's
    val/test falsely refused (CIs), refusal per Fitzpatrick type, and the synthetic-views comparison."""
    from dermlens.bundle import release_dir
    from dermlens.trust.measure_sources import measure_not_dermoscopy
    from dermlens.trust.outputs import trust_config

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    res = measure_not_dermoscopy(bundle or release_dir(), trust_config(config), threads or None, log, limit)
    _write(
        out,
        {**res, "command": "dermlens trust measure-not-dermoscopy" + (f" --limit {limit}" if limit else "")},
    )
    fr = ", ".join(f"{k} {v['rate']:.3f}" for k, v in res["test"]["dermoscopy_false_refusal"].items())
    typer.echo(
        f"PAD-UFES-20 test refused {res['test']['pad_ufes20_refused']['rate']:.3f}; false refusal {fr}"
    )


@app.command("measure-sources")
def measure_sources_cmd(
    bundle: MeasuredBundle = None,
    config: Config = None,
    out: FiguresOut = None,
    limit: Limit = None,
    threads: Threads = 0,
) -> None:
    """Calibration (ECE) and conformal coverage on each dermoscopy source's test split, with CIs."""
    from dermlens.bundle import release_dir
    from dermlens.trust.measure_sources import measure_sources
    from dermlens.trust.outputs import trust_config

    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    res = measure_sources(bundle or release_dir(), trust_config(config), threads or None, log, limit)
    _write(out, {**res, "command": "dermlens trust measure-sources" + (f" --limit {limit}" if limit else "")})
    for name, r in res["test"].items():
        m = r["meta"]
        typer.echo(
            f"{name} test: coverage {m['conformal']['coverage']['value']:.3f}, "
            f"ECE {m['calibration']['ece']['value']:.3f} (n {r['n_images']})"
        )
