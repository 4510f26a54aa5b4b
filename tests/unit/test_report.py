"""report.py: what the summaries put first, and a bf16 figure without empty panels."""

import matplotlib.image
from rich.console import Console

from lightning_mp.reporting.report import promotion_summary, render_png, render_table


def _promotions() -> list[dict]:
    defaults = [{"module": f"up.{i}.norm", "reason": "default", "scope": "module"} for i in range(10)]
    return [
        *defaults,
        {"module": "conv_in", "reason": "overflow", "scope": "module"},
        {"module": "mid", "reason": "overflow", "scope": "own_code"},
    ]


def _report(precision: str = "bf16-mixed", events=()) -> dict:
    run = {"precision": precision, "optimizer_steps": 40, "skipped_steps": len(events), "scaler": None}
    run["overflow_counts"] = {}
    return {"run": run, "scale_history": [], "events": list(events), "promotions": _promotions(), "modules": {}}


def test_promotions_decided_during_the_run_come_first_and_the_rest_are_counted():
    text = promotion_summary(_promotions(), limit=4)
    assert text == "conv_in (overflow), mid (overflow, own code), up.0.norm (default), up.1.norm (default) (+8 more)"
    assert promotion_summary([], limit=4) == "none"


def test_the_console_table_shows_an_overflow_promotion_hidden_behind_defaults():
    console = Console(width=200, record=True)
    console.print(render_table(_report()))
    text = console.export_text()
    assert "conv_in (overflow), mid (overflow, own code)" in text and "(+4 more)" in text


def test_a_bf16_figure_without_skipped_steps_has_no_empty_panel(tmp_path):
    clean = matplotlib.image.imread(render_png(_report(), tmp_path / "clean.png"))
    event = {"step": 3, "phase": "loss", "scale": None}
    skipped = matplotlib.image.imread(render_png(_report(events=[event]), tmp_path / "skipped.png"))
    assert clean.shape[1] < 0.6 * skipped.shape[1], "one panel, not an empty step axis beside the headroom"
