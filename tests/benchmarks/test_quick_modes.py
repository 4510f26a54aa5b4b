"""The benchmarks' --quick modes run (CI keeps them from rotting); they print figures and assert no timing."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import compiled, overhead, scaler_real, scaler_streams, step_cost, versions
from lightning_mp import AdaptiveMP


@pytest.mark.slow
def test_scaler_streams_quick_reports_every_scaler_on_every_stream():
    rows = scaler_streams.main(["--quick"])
    assert {(r["stream"], r["scaler"]) for r in rows} == {
        (stream, scaler) for stream in scaler_streams.STREAMS for scaler in scaler_streams.scalers(200)
    }
    gradscaler = [r for r in rows if r["scaler"] == "GradScaler"]
    assert all(r["skipped_vs_gradscaler"] == 1.0 for r in gradscaler)


@pytest.mark.slow
def test_overhead_quick_measures_ratios_against_lightning():
    rows = overhead.main(["--quick", "--only", "MLP-64 fp16"])
    # Every variant but the reference gets a row (a variant that failed to run would be missing)...
    assert [r["variant"] for r in rows] == [
        "Lightning MixedPrecision fp16 (again)",
        "AdaptiveMP fp16, default (predictive, stats cheap/25)",
        "AdaptiveMP fp16, stats off",
        "AdaptiveMP fp16, stats full/25",
        "AdaptiveMP fp16, classic scaler, stats off",
    ]
    # ...and its ratio is a measured one: finite, and the noise floor is the reference-vs-itself row's.
    again = rows[0]["ratio"]
    assert all(math.isfinite(r["ratio"]) for r in rows)
    assert all(r["noise"] == pytest.approx(max(abs(again - 1), 1e-4)) for r in rows)


@pytest.mark.slow
def test_compiled_quick_counts_graphs_and_sees_statistics_of_the_compiled_model():
    result = compiled.main(["--quick"])
    ours, lightning = result["runs"]["AdaptiveMP"][-1], result["runs"]["Lightning"][-1]
    assert ours["graphs"] == lightning["graphs"] >= 1 and ours["recompiles"] == lightning["recompiles"] == 0
    assert ours["samples"] > 0 and ours["modules_with_activations"] > 0
    assert math.isfinite(result["mean_ratio"])


@pytest.mark.slow
def test_step_cost_quick_reports_microseconds_for_every_variant():
    pytest.importorskip("transformers")
    rows = step_cost.main(["--quick", "--models", "GPT-2"])
    assert [r["variant"] for r in rows] == [
        "again", "AdaptiveMP default", "AdaptiveMP guard off", "AdaptiveMP stats off",
    ]  # fmt: skip
    assert all(r["model"] == "GPT-2" and math.isfinite(r["us"]) and r["step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_step_cost_pieces_time_each_piece_and_put_every_patch_back():
    pytest.importorskip("transformers")
    from lightning.pytorch.plugins.precision import Precision

    from lightning_mp.diagnosis.hooks import HookSet

    global_hooks = torch.nn.modules.module
    originals = (Precision.__dict__["_after_closure"], HookSet.__dict__["register"],
                 global_hooks.register_module_forward_hook)  # fmt: skip
    (row,) = step_cost.main(["--quick", "--pieces", "--models", "GPT-2"])
    reference, ours = row["pieces"]["reference"], row["pieces"]["AdaptiveMP"]
    assert ours["guard"] > 0 and ours["step or skip (guard.step_or_skip)"] > 0 and ours["model"] > 0
    assert "guard" not in reference and reference["plugin.optimizer_step"] > 0 and reference["model"] > 0
    now = (Precision.__dict__["_after_closure"], HookSet.__dict__["register"],
           global_hooks.register_module_forward_hook)  # fmt: skip
    assert now == originals


@pytest.mark.slow
def test_step_cost_paired_alternates_the_plugins_and_gives_noise_floors():
    pytest.importorskip("transformers")
    (row,) = step_cost.main(["--quick", "--paired", "--models", "GPT-2"])
    assert row["model"] == "GPT-2" and row["step_ms"] > 0
    assert all(math.isfinite(row[k]) for k in ("plugin", "plugin_sampling", "again", "guard", "guard_again"))
    fit_steps = 40 + 10  # --quick: 40 measured after 10 warm-up steps
    assert row["plugin_counted"] == fit_steps // 2, "odd steps ran as Lightning's plugin, unseen by the core"
    assert row["again_counted"] == fit_steps, "the noise floor runs AdaptiveMP on every step"


def test_options_for_the_paired_run_read_as_python_values_and_a_bad_one_is_named():
    assert step_cost._option("stats_every=100") == ("stats_every", 100)
    assert step_cost._option("stats=off") == ("stats", "off")
    assert step_cost._option("guard_nonfinite=False") == ("guard_nonfinite", False)
    with pytest.raises(SystemExit, match="--option 'stats_every' is invalid: write KEY=VALUE"):
        step_cost._option("stats_every")


def test_the_paired_run_alternates_the_guard_and_puts_the_real_one_back():
    from types import SimpleNamespace

    def real(optimizer, sharded=False):
        return True

    stepper = SimpleNamespace(guard=real)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(core=SimpleNamespace(stepper=stepper)))
    clock = step_cost.AlternateGuard(lambda real_guard: lambda *args: False)
    seen = []
    for batch_idx in range(4):
        clock.on_train_batch_start(trainer, None, None, batch_idx)
        seen.append(stepper.guard(None))
    assert seen == [True, False, True, False] and len(clock.times) == 3
    clock.teardown(trainer, None, "fit")
    assert stepper.guard is real and not hasattr(stepper, "_real_guard")


@pytest.mark.slow
def test_scaler_real_quick_compares_every_scaler():
    rows = scaler_real.main(["--quick"])
    assert [r["scaler"] for r in rows] == list(scaler_real.scalers(20))
    assert all(sum(r["time_at_scale"].values()) == pytest.approx(1.0, abs=0.01) for r in rows)
    assert all(math.isfinite(r["val_loss"]) for r in rows)
    # GradScaler starts at 2^16 and probes every 20 steps on this fp16 model: its counter must have seen skips,
    # and each skip halves its scale, so the time it spent at scale 2^16 cannot be the whole run.
    assert rows[0]["skipped"] > 0 and rows[0]["time_at_scale"].get("2^16", 0) < 1.0
    assert rows[0]["wasted_passes"] == rows[0]["skipped"] and rows[0]["rescued"] == 0
    # With rescue on, an overflow costs a pass, not a batch: every overflow GradScaler's rule meets is rescued.
    rescuing = rows[2]
    assert rescuing["rescued"] > 0 and rescuing["extra_passes"] >= rescuing["rescued"]


def test_fsdp1_check_script_plumbing_on_cpu():
    """The GPU-only FSDP1 check runs its whole scenario with AdaptiveMP on CPU, so the script itself is tested."""
    from benchmarks import fsdp1_check

    results = fsdp1_check.main(["--cpu-plumbing"])
    assert [r["precision"] for r in results] == ["16-mixed", "bf16-mixed"]
    for r in results:
        assert r["checks"] and all(r["checks"].values()), r["checks"]
        forward = [step for step, phase, module in r["ranks"][0]["events"] if phase == "forward"]
        assert forward == sorted(fsdp1_check.FAULT_STEPS)


def test_versions_times_an_earlier_commit_beside_this_checkout():
    rows = versions.main(["--ref", "HEAD", "--rounds", "1", "--steps", "2", "--only", "MLP-64 fp16"])
    assert [r["variant"] for r in rows] == [
        "Lightning fp16 (again)",
        "HEAD: AdaptiveMP fp16 default",
        "this checkout: AdaptiveMP fp16 default",
        "HEAD: AdaptiveMP fp16 stats off",
        "this checkout: AdaptiveMP fp16 stats off",
    ]
    old = versions.import_ref("HEAD")
    assert old.AdaptiveMP is not AdaptiveMP and old.__name__ == "lightning_mp_HEAD"


def test_backward_amax_cost_quick_times_every_model():
    from benchmarks import backward_amax_cost

    results = backward_amax_cost.main(["--quick"])
    assert set(results) == {"GPT-2", "BERT", "ViT"}
    assert all(r["step_ms"] > 0 and math.isfinite(r["backward_amax_us"]) for r in results.values())


@pytest.mark.slow
def test_lowbit_speed_smoke_runs_every_variant():
    pytest.importorskip("torchao")
    from benchmarks import lowbit_speed

    result = lowbit_speed.main(["--smoke"])
    assert list(result["ratio_to_bf16"]) == list(lowbit_speed.variants("cpu"))
    assert all(math.isfinite(r) and r > 0 for r in result["ratio_to_bf16"].values())
    assert result["shapes"] == [(64, 256), (256, 64)]  # the feed-forward layers, less the first and the head


def test_against_judges_a_committed_comparison_against_any_reference(capsys):
    from benchmarks import against

    path = str(Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compare_nlp.json")
    by_fp32 = against.main([path, "--reference", "fp32"])
    assert by_fp32["fp16_underflow"].startswith("worse than fp32: final val loss") and "fp32" not in by_fp32
    by_bf16 = against.main([path, "--reference", "bf16"])
    assert by_bf16["int8"] == "within noise of bf16" and "| fp8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--reference 'fp64' is not in"):
        against.main([path, "--reference", "fp64"])


def test_lost_update_cost_smoke_runs_both_optimizers():
    pytest.importorskip("torchao")
    from benchmarks import lost_update_cost

    result = lost_update_cost.main(["--dim", "32", "--layers", "1", "--repeats", "2"])
    assert list(result) == ["AdamW", "stochastic"]
    assert all(math.isfinite(v) and v > 0 for row in result.values() for k, v in row.items() if k != "sampled_extra_ms")


def test_the_committed_low_precision_weights_runs_say_what_the_readme_says():
    """``benchmarks/results/weights_nlp.json`` (``python -m benchmarks.weights_remedies``): plain bf16 weights are
    worse than fp32 and lose updates; Kahan and fp32 masters keep them and are within noise."""
    from lightning_mp.cli.compare import group_by_precision
    from lightning_mp.cli.verdict import verdict

    rows = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "weights_nlp.json").read_text())
    groups = group_by_precision(rows)
    assert verdict(groups["bf16-true"], groups["fp32"]).startswith("worse than fp32")
    assert all(r["lost_update_share"] > 0.3 for r in groups["bf16-true"])
    for remedy in ("kahan", "fp32 masters", "bf16 autocast"):
        assert verdict(groups[remedy], groups["fp32"]) == "within noise of fp32"
        assert all(r["lost_update_share"] < 0.01 for r in groups[remedy])
    assert groups["kahan"][0]["state_bytes"]["share_of_fp32"] == pytest.approx(0.625, abs=0.01)
