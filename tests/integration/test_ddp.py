"""AdaptiveMP under Lightning's DDP and ModelParallelStrategy (FSDP2) on CPU: decisions are identical on every
rank even when only one rank's data overflows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import NaiveLogSumExp, line_of

ROOT = Path(__file__).resolve().parents[2]


def _run_worker(out: Path, worker: str, *args: str) -> tuple[dict, dict]:
    """Run a two-process worker module (it launches its second rank itself); what each rank wrote."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.integration.{worker}", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return rank0, rank1


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["ddp_worker", "model_parallel_worker"], ids=["ddp", "fsdp2"])
def test_overflow_on_one_rank_gives_identical_promotions_and_weights(tmp_path, worker):
    rank0, rank1 = _run_worker(tmp_path, worker)
    assert rank0["fp32_modules"] == rank1["fp32_modules"] == ["middle"]
    assert rank0["events"] == rank1["events"]
    if worker == "ddp_worker":
        # Only rank 1's batch overflows; both ranks replay their own batch and take rank 1's finding, from the
        # first event on, so the second event promotes (promote_after=2).
        line = f"helpers.py:{line_of(NaiveLogSumExp.forward, 'torch.exp')}"
        assert [e[1:] for e in rank0["events"]] == [["forward", "middle", "aten::exp", line, True]] * 2
        assert rank0["skipped_steps"] == rank1["skipped_steps"] == 2
    else:
        # Sharded parameters: no replay (it would run the strategy's collectives again); the cheap attribution
        # arms the probe on the first event and names the module from the second.
        assert [e[1:] for e in rank0["events"]] == [["forward", None, None, None, None]] + [
            ["forward", "middle", None, None, None]
        ] * 2
        assert rank0["skipped_steps"] == rank1["skipped_steps"] == 3
    assert rank0["scale"] == rank1["scale"] == 16.0
    assert rank0["weights"] == rank1["weights"]


@pytest.mark.slow
def test_a_block_overflowing_in_its_own_code_on_one_rank_is_promoted_on_every_rank(tmp_path):
    rank0, rank1 = _run_worker(tmp_path, "ddp_worker", "spiky")
    assert rank0["fp32_modules"] == rank1["fp32_modules"] == ["net.2"]
    assert rank0["scopes"] == rank1["scopes"] == ["own_code"]
    assert rank0["events"] == rank1["events"] and [e[2] for e in rank0["events"]] == ["net.2", "net.2"]
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 2, "nothing skipped after the promotion"
    assert rank0["weights"] == rank1["weights"]


@pytest.mark.slow
def test_a_backward_overflow_is_rescued_identically_on_every_rank(tmp_path):
    """Rescue under DDP: the overflow flags come from all-reduced gradients and the forward check is collective, so
    both ranks re-run the same steps together (the re-runs' gradient all-reduces match) and end identical."""
    rank0, rank1 = _run_worker(tmp_path, "ddp_worker", "rescue")
    assert rank0["rescued_steps"] == rank1["rescued_steps"] >= 1
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 0 and rank0["events"] == rank1["events"] == []
    assert rank0["scale"] == rank1["scale"] < 16.0
    assert rank0["weights"] == rank1["weights"]


@pytest.mark.slow
def test_a_low_bit_layer_moves_back_on_every_rank_when_one_rank_measures_it(tmp_path):
    pytest.importorskip("torchao")
    rank0, rank1 = _run_worker(tmp_path, "ddp_worker", "fp8")
    assert rank0["moved"] == rank1["moved"] == [["mid", 4, "quantization"]]  # only rank 1 saw the massive token
    assert rank0["low_bit_layers"] == rank1["low_bit_layers"] == ["inp", "mid2"]
    assert rank0["weights"] == rank1["weights"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "remedy"), [("ddp", "fp32"), ("ddp", "stochastic"), ("fsdp2", "fp32"), ("fsdp2", "kahan")]
)
def test_bf16_weights_and_their_remedy_stay_identical_on_every_rank(tmp_path, strategy, remedy):
    rank0, rank1 = _run_worker(tmp_path, "weights_worker", strategy, remedy)
    assert rank0 == rank1  # weights, masters, lost-update figures: one run, not two
    assert rank0["dtypes"] == ["torch.bfloat16"] and rank0["remedies"] == [remedy]
    assert rank0["lost"] < 0.01  # the remedy keeps the updates on both ranks (a bf16 Kahan buffer: ~0.2% residue)
    if remedy == "fp32":  # the masters hold what bf16 cannot: sub-ulp progress the weights only round from
        weights, masters = rank0["weights"], rank0["masters"]
        assert len(masters) == len(weights) and any(m != w for m, w in zip(masters, weights))
        assert all(abs(m - w) <= abs(m) * 2**-8 + 1e-30 for m, w in zip(masters, weights))
    else:
        assert rank0["optimizer"] == {"stochastic": "_AdamW", "kahan": "AdamW"}[remedy]
        assert rank0["share_of_fp32"] <= 0.625
