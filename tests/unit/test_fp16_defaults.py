"""The fp16 defaults keep the modules whose CPU fp16 kernels really go wrong, and only those
(``benchmarks/fp16_norms.py`` measures the whole table). If torch fixes these kernels, these tests say so."""

import torch
from torch import nn

from lightning_mp.fallback import apply_fp32, by_type
from lightning_mp.formats import FORMATS

torch.set_num_threads(1)  # the LayerNorm backward keeps one fp16 gradient buffer per thread


def _island(module: nn.Module) -> nn.Module:
    holder = nn.Sequential(module)
    apply_fp32(holder, by_type(type(module)), "cpu")
    return holder


def test_the_fp16_defaults_are_layernorm_and_logsoftmax():
    assert FORMATS["16-mixed"].fp32_defaults == (nn.LayerNorm, nn.LogSoftmax)
    assert FORMATS["bf16-mixed"].fp32_defaults == FORMATS["32-true"].fp32_defaults == ()


def test_fp16_log_softmax_over_a_large_vocabulary_is_minus_infinity_and_its_island_is_not():
    gen = torch.Generator().manual_seed(0)
    logits = (0.02 * torch.randn(2, 131072, generator=gen)).half()  # a 128k-token head at initialization
    with torch.autocast("cpu", dtype=torch.float16):
        plain = nn.LogSoftmax(dim=-1)(logits)
        island = _island(nn.LogSoftmax(dim=-1))(logits)
    assert torch.isinf(plain).all(), "the row's sum of exponentials is kept in fp16"
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert (island.double() - reference).abs().max() < 1e-5


def test_fp16_layernorm_weight_gradients_overflow_under_a_loss_scale_and_its_island_does_not():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 64, 512, generator=gen) * 4).half()
    dy = (torch.rand(8, 64, 512, generator=gen) * 256).half()  # a loss-scaled upstream gradient, one sign
    grads = []
    for module in (nn.LayerNorm(512), _island(nn.LayerNorm(512))):
        with torch.autocast("cpu", dtype=torch.float16):
            y = module(x)
        y.backward(dy.to(y.dtype))
        grads.append(list(module.parameters())[1].grad)  # the bias: the sum of the upstream gradient
    plain, island = grads
    assert not torch.isfinite(plain).all(), "dbeta is summed in an fp16 buffer"
    assert torch.isfinite(island).all()


def test_groupnorm_and_softmax_stay_within_fp16_rounding_without_an_island():
    gen = torch.Generator().manual_seed(0)
    for module, shape in ((nn.GroupNorm(8, 64), (8, 64, 16, 16)), (nn.Softmax(dim=-1), (8, 4, 64, 64))):
        x = (torch.randn(*shape, generator=gen) * 1e4).half()  # up to about 5e4
        with torch.autocast("cpu", dtype=torch.float16):
            y = module(x)
        reference = module.double()(x.double())
        error = ((y.double() - reference).abs().max() / reference.abs().max()).item()
        assert torch.isfinite(y).all() and error < 1e-3, (type(module).__name__, error)
