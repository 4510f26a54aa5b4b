"""AdaptiveFSDPMP, the FSDPPrecision subclass Lightning's FSDP1 strategy requires. FSDP1 needs CUDA, so this
checks on CPU what can be checked there: Lightning accepts it, it builds the FSDP mixed-precision config it
documents, it scales the loss once, and ranks holding different plain-tensor gradient shards (what FSDP1's
flat parameters give) agree on every skip and scale. ``benchmarks/gpu.py --fsdp1`` runs it end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from lightning_mp import AdaptiveFSDPMP, AdaptiveLossScaler, AdaptiveMP
from tests.helpers import TinyRegressor

ROOT = Path(__file__).resolve().parents[2]
# The default fp16 scaler is built for CUDA; on a machine without it torch disables it, which is fine here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled:UserWarning")


def test_lightnings_fsdp_strategy_takes_it_and_refuses_plain_adaptive_mp():
    strategy = FSDPStrategy()
    plugin = AdaptiveFSDPMP("bf16-mixed")
    strategy.precision_plugin = plugin  # Lightning's own check: isinstance(plugin, FSDPPrecision)
    assert strategy.precision_plugin is plugin
    assert isinstance(plugin, FSDPPrecision) and isinstance(plugin.adaptive, AdaptiveMP)
    with pytest.raises(TypeError, match="FSDPPrecision"):
        strategy.precision_plugin = AdaptiveMP("bf16-mixed")


def test_fsdp_config_leaves_parameters_and_reductions_in_fp32():
    for precision in ("16-mixed", "bf16-mixed", "32-true"):
        config = AdaptiveFSDPMP(precision).mixed_precision_config
        assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (None, None, None)
    reference = FSDPPrecision("bf16-mixed").mixed_precision_config  # Lightning's: gathers bf16 parameters
    assert reference.param_dtype == torch.bfloat16


def test_auto_is_resolved_at_construction_and_device_must_be_cuda():
    assert AdaptiveFSDPMP().precision in ("16-mixed", "bf16-mixed")
    with pytest.raises(ValueError, match=r"device='cpu'.*cuda"):
        AdaptiveFSDPMP("bf16-mixed", device="cpu")


def test_the_loss_is_scaled_once_like_adaptive_mp():
    """AdaptiveMP.pre_backward must not hand the scaled loss to FSDPPrecision.pre_backward, which scales too."""
    model = TinyRegressor()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    loss = torch.tensor(3.0)
    results = []
    for cls in (AdaptiveMP, AdaptiveFSDPMP):
        plugin = cls("16-mixed", device="cuda")
        plugin.scaler = AdaptiveLossScaler("cpu", init_scale=8.0)  # a CPU scaler so the scale is applied here
        results.append(plugin.pre_backward(loss, model))
    assert results[0].item() == results[1].item() == 24.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sharded", "unsharded"])
def test_ranks_with_different_gradient_shards_agree_on_skips_and_scale(tmp_path, mode):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.sharded_grads_worker", str(tmp_path), mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    skipped = [[d["skipped"] for d in rank] for rank in (rank0, rank1)]
    if mode == "sharded":
        assert rank0 == rank1, "every rank skips the same steps with the same scale"
        assert [i + 1 for i, s in enumerate(skipped[0]) if s] == [3, 4, 9]
        assert [d["guard"] for d in rank0] == [s in (3, 4, 9) for s in range(1, 13)]
    else:
        # The reference: without the flag each rank judges only its own shard and the ranks drift apart,
        # which is the desynchronisation AdaptiveFSDPMP exists to prevent.
        assert not any(skipped[0]) and [i + 1 for i, s in enumerate(skipped[1]) if s] == [3, 4, 9]
        assert [d["scale"] for d in rank0] != [d["scale"] for d in rank1]


def test_every_read_only_attribute_of_the_inner_plugin_reads_through():
    plugin = AdaptiveFSDPMP("bf16-mixed", sharded_gradients=True, stats="off")
    assert plugin.overflow_counts == {} and plugin.optimizer_steps == 0 and plugin.skipped_steps == 0
    assert plugin.stats_dtype == torch.bfloat16 and plugin.options.stats == "off"
    assert plugin.adaptive.options.sharded_gradients
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        plugin.nonexistent  # noqa: B018
