"""The API's /monitor page: the same drift summary and report as `dermlens monitor`, for a browser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens.monitor.drift import compare, parse_time, records_frame, select_window
from dermlens.monitor.reference import Reference
from dermlens.monitor.report import render_html


def monitor_view(
    store: Any,
    bundle: Path,
    last: int | None,
    since: str | None,
    as_json: bool,
    field: Callable[[str, list[str]], dict] | None = None,
) -> Any:
    """The summary as a dict (as_json) or the HTML report, for the records in `store`; `field(model_version,
    classes)` adds field performance on confirmed cases."""
    ref = Reference.load(bundle)
    history = records_frame(store, ref.model_version)
    window = select_window(history, parse_time(since), None, last)
    summary = compare(window, ref)
    perf = field(ref.model_version, ref.classes) if field is not None else None
    if as_json:
        return {**summary.to_dict(), **({"field_performance": perf} if perf is not None else {})}
    return render_html(summary, window, history, ref, perf)
