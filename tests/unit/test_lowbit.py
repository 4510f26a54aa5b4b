"""fp8 / int8 layers without a Trainer: which layers are chosen, what the watch measures, what moves them back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from lightning_mp.errors import ConfigError  # noqa: E402
from lightning_mp.fallback.escalation import EscalationLadder, Rung  # noqa: E402
from lightning_mp.lowbit import (  # noqa: E402
    SNR_FLOOR_DB,
    UNDERFLOW_LIMIT,
    LayerSample,
    LowBitLayers,
    default_selection,
    gemm_snr_db,
    judge,
)
from lightning_mp.lowbit.convert import convert, revert, select  # noqa: E402
from lightning_mp.lowbit.watch import LowBitWatch  # noqa: E402


class Net(nn.Module):
    """An input projection, two blocks, a tiny layer, a layer of odd width, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(2))
        self.tiny = nn.Linear(64, 32)  # 2048 weights: under 64 x 64
        self.odd = nn.Linear(64, 72 + 1)  # 73 outputs: not divisible by 16
        self.head = nn.Linear(73, 10)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.odd(h + self.tiny(h).repeat(1, 2)))


def test_the_default_leaves_the_first_last_tiny_and_odd_layers_in_bf16():
    assert default_selection(Net()) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]


def test_a_choice_uses_the_fp32_modules_grammar_and_exclusions_apply():
    net = Net()
    assert select(net, ["blocks.1.*"], (), fp32=set()) == ["blocks.1.0", "blocks.1.2"]
    assert select(net, lambda m, fqn: fqn.endswith(".0"), "blocks.0.*", fp32=set()) == ["blocks.1.0"]
    assert select(net, None, ["blocks.*.2"], fp32={"blocks.0.0"}) == ["blocks.1.0"]  # fp32 modules are never converted


def test_a_pattern_that_matches_nothing_or_an_ineligible_layer_is_an_error():
    with pytest.raises(ConfigError, match=r"low_bit_modules=...\) pattern\(s\) \['blocks\.9\.\*'\] match no module"):
        select(Net(), ["blocks.9.*"], (), fp32=set())
    with pytest.raises(ConfigError, match=r"bf16_modules=...\) pattern\(s\) \['hed'\]"):
        select(Net(), None, ["hed"], fp32=set())
    with pytest.raises(ConfigError, match=r"names odd, which cannot be converted: its weight is 73 x 64"):
        select(Net(), ["odd"], (), fp32=set())
    assert "odd" not in select(Net(), [nn.Linear], (), fp32=set()), "a class takes the eligible layers only"
    with pytest.raises(ValueError, match="low_bit_modules entry 3 is invalid"):
        select(Net(), [3], (), fp32=set())


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_convert_keeps_the_parameters_and_the_state_dict_and_revert_gives_them_back(kind):
    net = Net()
    params = dict(net.named_parameters())
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    convert(net, kind, "tensorwise", ["blocks.0.0", "blocks.1.2"])
    assert type(net.blocks[0][0]).__name__ in ("Float8Linear", "Int8MixedPrecisionTrainingLinear")
    assert type(net.blocks[0][2]) is nn.Linear
    assert all(p is params[name] for name, p in net.named_parameters()), "the optimizer's references stay valid"
    state = net.state_dict()
    assert list(state) == list(plain) and all(
        type(v) is torch.Tensor and v.dtype == torch.float32 for v in state.values()
    )
    seen = []
    net.blocks[0][0].register_forward_hook(lambda m, a, o: seen.append(m))
    back = revert(net, "blocks.0.0")
    assert type(back) is nn.Linear and net.blocks[0][0] is back
    assert back.weight is params["blocks.0.0.weight"] and back.bias is params["blocks.0.0.bias"]
    net(torch.randn(2, 32))
    assert seen == [back], "the user's hooks move with the layer"


def _measure(kind: str, x: torch.Tensor, recipe: str = "tensorwise") -> LayerSample:
    layer = nn.Sequential(nn.Linear(x.shape[-1], 64))
    convert(layer, kind, recipe, ["0"], "cpu")
    watch = LowBitWatch(kind)
    watch.arm({"0": layer[0]}, step=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.requires_grad_())
    out.float().sum().backward()
    return watch.collect()["0"]


def test_the_watch_measures_a_healthy_layer_as_healthy():
    torch.manual_seed(0)
    for kind, floor in (("fp8", 22.0), ("int8", 35.0)):  # e4m3: ~2^-4 rounding per operand; int8: 127 steps a row
        x = torch.randn(256, 64)
        sample = _measure(kind, x)
        assert sample.step == 3 and sample.snr_db > floor and judge(sample) is None
        assert sample.input_underflow < 0.02 and sample.saturation == 0.0
        assert sample.input_amax == x.abs().max().item()  # what the layer quantizes: on a CPU, the fp32 input
        assert sample.grad_amax == pytest.approx(1.0) and sample.grad_underflow == 0.0  # d(sum)/d(out) is all ones


def test_a_massive_token_is_underflow_for_tensorwise_fp8_and_not_for_rowwise_or_int8():
    torch.manual_seed(0)
    x = torch.randn(16, 16, 64)
    x[:, 0] *= 1e5  # one token per sequence, as attention sinks
    tensorwise = _measure("fp8", x)
    assert tensorwise.input_underflow > UNDERFLOW_LIMIT and tensorwise.snr_db < SNR_FLOOR_DB
    assert tensorwise.input_amax > 1e5 and judge(tensorwise) is not None
    assert judge(_measure("fp8", x, "rowwise")) is None  # a scale per token
    assert judge(_measure("int8", x)) is None


def test_a_channel_outlier_is_underflow_for_rowwise_int8():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 0] *= 1e3
    sample = _measure("int8", x)
    assert sample.input_underflow > 0.5 and "quantize to zero" in judge(sample)
    assert judge(_measure("fp8", x)) is None  # e4m3 with a dynamic scale holds a 1e3 spread


def test_the_gemm_snr_is_per_row_so_one_huge_row_does_not_hide_the_rest():
    reference = torch.ones(4, 8)
    reference[0] *= 1e4
    output = reference.clone()
    output[1:] = 0  # every small row lost
    assert gemm_snr_db(output, reference).item() == pytest.approx(0.0)
    overall = 10 * torch.log10(reference.pow(2).sum() / (output - reference).pow(2).sum())
    assert overall > 70, "a global ratio would call this GEMM excellent"


def test_the_escalation_ladder_leaves_the_low_bit_format_before_giving_up():
    rungs = EscalationLadder.candidates("why", None, (), [], can_switch_to_bf16=False, low_bit_left=True)
    assert [r.rung for r in rungs] == [Rung.LEAVE_LOW_BIT, Rung.GIVE_UP]
    rungs = EscalationLadder.candidates("why", None, (), [], can_switch_to_bf16=False)
    assert [r.rung for r in rungs] == [Rung.GIVE_UP]


def test_layers_already_sharded_by_fsdp2_are_refused_with_what_to_do():
    net = Net()
    net.blocks[1][0].__class__ = type("FSDPLinear", (nn.Linear,), {})  # what fully_shard does to a module's class
    with pytest.raises(ConfigError, match=r"cannot convert blocks.1.0: it is already sharded by fully_shard"):
        select(net, None, (), fp32=set())


def test_a_sample_with_a_non_finite_value_is_not_judged():
    layers = LowBitLayers("tensorwise", [nn.Linear], (), fallback=True)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    layers.setup(net, "fp8", "fp8-mixed", set(), "cpu")
    x = torch.randn(32, 64)
    x[0, 0] = float("inf")  # what the step's guard skips: not the format's fault
    for step in (1, 2, 3):
        layers.arm(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x)
        assert layers.collect() == []
    assert layers.latest == {} and layers.worst == {}


def test_a_layer_moved_back_keeps_full_backward_hooks_and_is_not_converted_again():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    layers = LowBitLayers("tensorwise", [nn.Linear], (), fallback=True)
    calls = []
    net[1].register_full_backward_hook(lambda m, gin, gout: calls.append(m))
    layers.setup(net, "fp8", "fp8-mixed", set(), "cpu")
    assert type(net[1]).__name__ == "Float8Linear"
    layers.move_back("1", promotion="moved")
    net(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert calls == [net[1]], "the full backward hook still fires on the layer put back"
    again = LowBitLayers("tensorwise", [nn.Linear], (), fallback=True)  # a later fit's core, the same model
    again.setup(net, "fp8", "fp8-mixed", set(), "cpu")
    assert type(net[1]) is nn.Linear and again.layers.keys() == {"0"} and "1" in again.moved


def test_layers_inside_an_fp32_module_are_not_converted():
    assert select(Net(), None, (), fp32={"blocks.0"}) == ["blocks.1.0", "blocks.1.2"]
