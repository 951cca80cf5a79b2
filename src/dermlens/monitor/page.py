"""The API's /monitor page: the same drift summary and report as `dermlens monitor`, for a browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermlens.monitor.drift import compare, parse_time, records_frame, select_window
from dermlens.monitor.reference import Reference
from dermlens.monitor.report import render_html


def monitor_view(store: Any, bundle: Path, last: int | None, since: str | None, as_json: bool) -> Any:
    """The summary as a dict (as_json) or the HTML report, for the records in `store`."""
    ref = Reference.load(bundle)
    history = records_frame(store, ref.model_version)
    window = select_window(history, parse_time(since), None, last)
    summary = compare(window, ref)
    return summary.to_dict() if as_json else render_html(summary, window, history, ref)
