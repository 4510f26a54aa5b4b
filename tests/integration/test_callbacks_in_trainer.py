"""The monitor, the diagnostics and the report, from a real tiny fit."""

import csv
import json
import warnings

import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mp import AdaptiveLossScaler, AdaptiveMP, LossScaleMonitor, OverflowDiagnostics, PrecisionReport
from lightning_mp.reporting.report import render_table
from tests.helpers import NaiveLogSumExp, TinyRegressor, TroubleNet, fit, scaled_loader


def overflowing_fit(tmp_path, **plugin_kwargs):
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0), stats_every=2, **plugin_kwargs)
    logger = CSVLogger(tmp_path, name="run")
    _, trainer = fit(
        plugin,
        model_cls=lambda: TroubleNet(NaiveLogSumExp(), lr=1e-4),
        data=scaled_loader(1.5),
        max_steps=8,
        logger=logger,
        log_every_n_steps=1,
    )
    return plugin, trainer


def test_only_the_plugin_gives_all_three_callbacks_once(tmp_path):
    plugin, trainer = overflowing_fit(tmp_path)
    kinds = [type(cb) for cb in trainer.callbacks]
    for cls in (LossScaleMonitor, OverflowDiagnostics, PrecisionReport):
        assert kinds.count(cls) == 1
    plugin = AdaptiveMP("bf16-mixed")
    mine = PrecisionReport(dirpath=str(tmp_path / "mine"), console=False)
    _, trainer = fit(plugin, max_steps=2, callbacks=[mine])
    assert [cb for cb in trainer.callbacks if isinstance(cb, PrecisionReport)] == [mine]
    assert (tmp_path / "mine" / "precision_report.json").exists()


def test_report_holds_the_events_and_promotions_the_run_produced(tmp_path):
    plugin, trainer = overflowing_fit(tmp_path)
    path = tmp_path / "run" / "version_0" / "precision_report.json"
    report = json.loads(path.read_text())
    assert report["schema"] == "lightning-mp/precision-report/1"
    assert report["events"] == [e.to_dict() for e in plugin.overflow_events]
    assert report["promotions"] == [vars(p) for p in plugin.promotions]
    assert {"middle"} <= {p["module"] for p in report["promotions"]}
    assert report["run"]["skipped_steps"] == plugin.skipped_steps
    assert report["run"]["scaler"]["final_scale"] == plugin.scaler.get_scale()
    assert [s for _, s in report["scale_history"]][-1] == plugin.scaler.get_scale()
    assert len(report["scale_history"]) == 8
    assert set(report["modules"]) >= {"inp", "middle", "head"}
    markdown = (path.parent / "precision_report.md").read_text()
    assert "| `middle` | overflow |" in markdown


def test_png_is_a_valid_image(tmp_path):
    _, trainer = overflowing_fit(tmp_path)
    png = tmp_path / "run" / "version_0" / "precision_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 500


def test_logged_metric_names_appear_in_the_csv_logger_file(tmp_path):
    plugin, trainer = overflowing_fit(tmp_path)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {
        "precision/loss_scale",
        "precision/skipped_steps",
        "precision/overflow_events",
        "precision/fp32_modules",
    } <= columns
    skipped = [float(r["precision/skipped_steps"]) for r in rows if r.get("precision/skipped_steps")]
    assert skipped[-1] == plugin.skipped_steps


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_headroom_is_logged_and_underflow_only_in_fp16(tmp_path, precision):
    """Finite headroom is logged per module; underflow only where the format's smallest normal is above fp32's."""
    fit(AdaptiveMP(precision, stats_every=1), max_steps=3, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        columns = set(next(csv.DictReader(f)))
    assert any(c.startswith("precision/headroom_bits/") for c in columns)
    assert any(c.startswith("precision/underflow/") for c in columns) == (precision == "16-mixed")


def test_first_blame_of_a_module_warns_once(tmp_path, recwarn):
    overflowing_fit(tmp_path)
    warnings = [str(w.message) for w in recwarn if ": middle: aten::exp in float16 produced inf" in str(w.message)]
    assert len(warnings) == 1, "one warning per place, however often it recurs"


def test_bf16_run_reports_events_and_headroom_without_scaler_fields(tmp_path):
    plugin = AdaptiveMP("bf16-mixed", stats_every=1)
    fit(plugin, model_cls=lambda: TinyRegressor(poison_steps={2}), max_steps=4, default_root_dir=tmp_path)
    report = json.loads((tmp_path / "precision_report.json").read_text())
    assert report["run"]["scaler"] is None and report["scale_history"] == []
    assert [(e["phase"], e["op"]) for e in report["events"]] == [("loss", "aten::mul")]
    assert report["modules"]["net.0"]["activation_headroom_bits"] == pytest.approx(
        torch.log2(torch.tensor(torch.finfo(torch.bfloat16).max)).item()
        - torch.log2(torch.tensor(report["modules"]["net.0"]["activation_amax"])).item(),
        rel=1e-4,
    )
    # 120-odd bits of headroom are no risk: the console table does not call them "low headroom".
    rows = render_table(report).columns[0]._cells
    assert not any("low headroom" in row for row in rows) and "optimizer steps / skipped" in rows
    risky = json.loads(json.dumps(report))
    risky["modules"]["net.0"]["activation_headroom_bits"] = 3.0  # what an fp16 run near its range looks like
    assert "low headroom: net.0" in render_table(risky).columns[0]._cells


def test_statistics_off_leaves_modules_empty(tmp_path):
    plugin = AdaptiveMP("bf16-mixed", stats="off")
    fit(plugin, max_steps=3, default_root_dir=tmp_path)
    assert json.loads((tmp_path / "precision_report.json").read_text())["modules"] == {}


class GradientFaults(TinyRegressor):
    """Puts an inf into one layer's gradient on chosen steps: a backward event that names that layer at once."""

    def __init__(self, faults: dict[int, str]):
        super().__init__()
        self.faults = faults  # global step -> index of the nn.Sequential layer whose weight gradient goes inf

    def on_after_backward(self):
        layer = self.faults.get(self.global_step)
        if layer is not None:
            self.net[int(layer)].weight.grad[0, 0] = float("inf")


def test_a_newly_blamed_module_is_warned_about_after_the_event_buffer_is_full(recwarn):
    """With max_events=1 the kept-events list stops growing after the first event; the warning for a module
    blamed later must still come (it did not when the callback remembered a position in that list)."""
    plugin = AdaptiveMP("bf16-mixed", max_events=1, auto_fallback=False)
    fit(plugin, model_cls=lambda: GradientFaults({1: "0", 3: "2"}), max_steps=5)
    assert [e.module for e in plugin.overflow_events] == ["net.2"], "only the newest event is kept"
    warned = [str(w.message) for w in recwarn if str(w.message).startswith("lightning-mp: step")]
    assert [m.split(": ")[2] for m in warned] == ["net.0", "net.2"]
    # The gradients go bad in on_after_backward, which a replay of the step does not run: not reproduced, and
    # the cheap attribution (nearest non-finite parameter gradient) names the module.
    assert plugin.overflow_events[0].reproduced is False and plugin.overflow_events[0].op is None


def test_resuming_a_run_whose_plugin_added_the_callbacks_raises_no_warning_and_keeps_the_history(tmp_path):
    plugin, trainer = overflowing_fit(tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0), stats_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            resumed,
            model_cls=lambda: TroubleNet(NaiveLogSumExp(), lr=1e-4),
            data=scaled_loader(1.5),
            max_steps=10,
            ckpt_path=tmp_path / "last.ckpt",
        )
    assert not [w for w in caught if "Please add the following callbacks" in str(w.message)]
    assert resumed.scale_history[:8] == plugin.scale_history and len(resumed.scale_history) == 10


def test_a_resumed_run_does_not_repeat_the_warnings_of_its_earlier_events(tmp_path):
    plugin, trainer = overflowing_fit(tmp_path)
    assert plugin.overflow_events, "the first run had events to warn about"
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0), stats_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(resumed, model_cls=lambda: TroubleNet(NaiveLogSumExp(), lr=1e-4), data=scaled_loader(1.5), max_steps=9,
            ckpt_path=tmp_path / "last.ckpt")  # fmt: skip
    told = [str(w.message) for w in caught if str(w.message).startswith("lightning-mp: step")]
    assert not [m for m in told if int(m.split()[2].rstrip(":")) <= 8], told
