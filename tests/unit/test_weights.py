"""Lost updates, remedies and optimizer care, with the real optimizers (torch, torchao, optimi)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mp.errors import ConfigError
from lightning_mp.weights import LostUpdates, MasterCopies, care_messages, replacement, shadow_step
from lightning_mp.weights.care import clip_norm_in_fp32
from lightning_mp.weights.lost import module_names
from lightning_mp.weights.memory import training_state_bytes

torchao = pytest.importorskip("torchao")
optimi = pytest.importorskip("optimi")


def _design_linear(dtype=torch.bfloat16):
    """DESIGN.md's figure: a seeded Linear(64, 64) and a fixed batch, loss = mean of squared outputs."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).to(dtype)
    x = torch.randn(32, 64).to(dtype)
    return layer, x


def _five_steps(layer, x, optimizer, lost: LostUpdates | None = None):
    names = module_names(nn.Sequential(layer))
    for _ in range(5):
        optimizer.zero_grad()
        layer(x).float().pow(2).mean().backward()
        if lost is not None:
            lost.arm([optimizer], names)
        optimizer.step()
        if lost is not None:
            lost.collect()


def test_five_adamw_steps_at_lr_1e5_change_3_4_percent_of_bf16_weights_and_the_measure_says_why():
    layer, x = _design_linear()
    start = layer.weight.detach().clone()
    lost = LostUpdates()
    _five_steps(layer, x, torch.optim.AdamW(layer.parameters(), lr=1e-5), lost)
    changed = (layer.weight != start).float().mean().item()
    assert changed == pytest.approx(0.034, abs=0.001)  # DESIGN.md: 3.4%
    sample = lost.latest["0"]
    assert sample.unchanged > 0.95 and sample.lost > 0.9  # nearly every intended update rounds away
    assert lost.history and all(share > 0.9 for _, share in lost.history)


def test_stochastic_rounding_changes_23_percent_and_loses_nothing_on_average():
    layer, x = _design_linear()
    start = layer.weight.detach().clone()
    lost = LostUpdates()
    adamw = torchao.optim._AdamW(layer.parameters(), lr=1e-5, bf16_stochastic_round=True)
    _five_steps(layer, x, adamw, lost)
    assert (layer.weight != start).float().mean().item() == pytest.approx(0.23, abs=0.01)  # DESIGN.md: 23%
    assert lost.latest["0"].lost == 0.0 and lost.latest["0"].unchanged > 0.8


def test_kahan_summation_keeps_what_rounding_took_and_reads_near_zero():
    layer, x = _design_linear()
    lost = LostUpdates()
    _five_steps(layer, x, optimi.AdamW(layer.parameters(), lr=1e-5, weight_decay=0.0, kahan_sum=True), lost)
    assert lost.latest["0"].unchanged > 0.9  # the stored bf16 weights barely move ...
    assert lost.latest["0"].lost < 0.02  # ... but the compensation buffer holds the rest


def test_fp32_weights_lose_nothing():
    layer, x = _design_linear(torch.float32)
    lost = LostUpdates()
    _five_steps(layer, x, torch.optim.AdamW(layer.parameters(), lr=1e-5), lost)
    assert lost.latest["0"].lost == 0.0 and lost.latest["0"].unchanged == 0.0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_intended_update_is_the_step_an_fp32_copy_takes_and_the_real_state_is_untouched(kind):
    layer, x = _design_linear()
    reference = nn.Linear(64, 64)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})

    def build(params):
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)

    optimizer, fp32 = build(layer.parameters()), build(reference.parameters())
    for step in range(3):
        for model, opt in ((layer, optimizer), (reference, fp32)):
            opt.zero_grad()
            model(x.to(model.weight.dtype)).float().pow(2).mean().backward()
        reference.weight.grad.copy_(layer.weight.grad.float())  # the same gradients, so the same step
        reference.bias.grad.copy_(layer.bias.grad.float())
        if step:  # from the second step the fp32 copy must also start from the same weights and state
            with torch.no_grad():
                for p, q in zip(layer.parameters(), reference.parameters()):
                    q.copy_(p.float())
            for p, q in zip(layer.parameters(), reference.parameters()):
                fp32.state[q] = {k: v.float().clone() for k, v in optimizer.state[p].items()}
        state_before = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
        intended = shadow_step(optimizer, list(layer.parameters()))
        assert all(torch.equal(v, state_before[k]) for k, v in optimizer.state[layer.weight].items())
        fp32.step()
        torch.testing.assert_close(intended[layer.weight], reference.weight.detach(), rtol=0, atol=0)
        optimizer.step()


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    groups = [{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)


def test_replacements_keep_param_groups_and_settings():
    adamw = _adamw(nn.Linear(8, 8))
    sr = replacement(adamw, "stochastic")
    assert type(sr).__name__ == "_AdamW" and sr.bf16_stochastic_round
    assert [float(g["lr"]) for g in sr.param_groups] == pytest.approx([1e-2, 1e-3])  # torchao keeps an fp32 tensor
    assert sr.param_groups[0]["betas"] == (0.8, 0.95) and sr.param_groups[0]["eps"] == 1e-7
    assert [g["weight_decay"] for g in sr.param_groups] == [0.05, 0.0]
    kahan = replacement(adamw, "kahan")
    assert isinstance(kahan, optimi.AdamW) and kahan.param_groups[0]["beta1"] == 0.8
    assert [g["params"] for g in kahan.param_groups] == [g["params"] for g in adamw.param_groups]


@pytest.mark.parametrize("remedy", ["stochastic", "kahan"])
def test_a_replacement_takes_torchs_step_on_fp32_weights(remedy):
    """The remedies act on low-precision weights only: on fp32 ones the replacement is torch's AdamW."""
    torch.manual_seed(0)
    ours, reference = nn.Linear(8, 8), nn.Linear(8, 8)
    reference.load_state_dict(ours.state_dict())
    pairs = [(ours, replacement(_adamw(ours), remedy)), (reference, _adamw(reference))]
    x = torch.randn(4, 8)
    for _ in range(3):
        for model, optimizer in pairs:
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "remedy", "says"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "kahan", "nesterov"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "stochastic", "AdamW only"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "kahan", "no optimi equivalent"),
        (lambda p: torch.optim.AdamW(p, lr=0.1, maximize=True), "kahan", "maximize"),
    ],
)
def test_a_replacement_that_cannot_be_made_says_what_to_use(optimizer, remedy, says):
    with pytest.raises(ConfigError, match=f"master_weights='{remedy}'.*{says}.*master_weights='fp32'"):
        replacement(optimizer(nn.Linear(2, 2).parameters()), remedy)


def test_fp32_masters_take_exactly_the_fp32_optimizers_steps():
    torch.manual_seed(0)
    low, high = nn.Linear(16, 16).bfloat16(), nn.Linear(16, 16)
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    optimizer = torch.optim.AdamW(low.parameters(), lr=1e-5)
    copies, reference = MasterCopies(optimizer), torch.optim.AdamW(high.parameters(), lr=1e-5)
    for _ in range(5):
        optimizer.zero_grad()  # the masters' gradients (the training loop's zero_grad)
        grads = [torch.randn_like(p, dtype=torch.float32) for p in high.parameters()]
        for p, q, g in zip(low.parameters(), high.parameters(), grads):
            p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
        copies.gather()
        assert all(p.grad is None for p in low.parameters())  # moved into the masters, not kept twice
        optimizer.step()
        reference.step()
        copies.scatter()
    assert all(torch.equal(m, q.detach()) for (_, m), q in zip(copies.pairs, high.parameters()))
    assert all(torch.equal(p, q.detach().bfloat16()) for p, q in zip(low.parameters(), high.parameters()))


def test_an_eps_that_is_zero_in_fp16_state_is_refused_because_torch_turns_the_weights_nan():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).half()
    adam = torch.optim.Adam(layer.parameters(), lr=1e-3)  # eps=1e-8: 0 in fp16
    layer.weight.grad = torch.zeros_like(layer.weight)  # an element whose gradient is 0 (a masked token)
    layer.bias.grad = torch.ones_like(layer.bias)
    with pytest.raises(ConfigError, match=r"eps=1e-08, which is 0 in float16.*eps>="):
        care_messages(adam, remedied=False)
    adam.step()  # what the check prevents: 0 / (sqrt(0) + 0)
    assert torch.isnan(layer.weight).all()
    fixed = torch.optim.Adam(layer.parameters(), lr=1e-3, eps=1e-4)
    assert care_messages(fixed, remedied=True) == []


def test_an_lr_and_a_weight_decay_below_the_weights_resolution_are_told_and_a_remedy_silences_them():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).bfloat16()
    small = torch.optim.AdamW(layer.parameters(), lr=1e-5, weight_decay=0.01)
    messages = care_messages(small, remedied=False, name="optimizer 0")
    assert len(messages) == 2
    assert "optimizer 0 AdamW has lr=1e-05, below half a unit in the last place of 9" in messages[0]
    assert "weight_decay=0.01 with lr=1e-05" in messages[1] and "weight decay does nothing" in messages[1]
    assert care_messages(torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0), remedied=False) == []
    assert care_messages(small, remedied=True) == []
    # the warning's figure is the share of first updates that really round away: AdamW's first step is ~lr
    start = layer.weight.detach().clone()
    layer(torch.randn(8, 64).bfloat16()).float().pow(2).mean().backward()
    small.step()
    unchanged = (layer.weight == start).float().mean().item()
    share = float(messages[0].split("last place of ")[1].split("%")[0]) / 100
    assert unchanged == pytest.approx(share, abs=0.03)


def test_lbfgs_with_fp16_weights_is_refused():
    with pytest.raises(ConfigError, match="LBFGS"):
        care_messages(torch.optim.LBFGS(nn.Linear(2, 2).half().parameters()), remedied=False)


def test_fp16_gradients_are_clipped_with_the_norm_taken_in_fp32_where_torch_zeroes_them():
    grads = torch.full((100, 100), 1000.0)  # norm 1e5: inf in fp16
    theirs, ours = (nn.Parameter(torch.zeros(100, 100, dtype=torch.float16)) for _ in range(2))
    theirs.grad, ours.grad = grads.half(), grads.half()
    torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert theirs.grad.abs().max() == 0  # torch: norm inf, every gradient multiplied by 0
    assert clip_norm_in_fp32(torch.optim.SGD([ours], lr=0.1), 1.0)
    reference = nn.Parameter(torch.zeros(100, 100))
    reference.grad = grads.half().float()
    torch.nn.utils.clip_grad_norm_([reference], 1.0)  # what fp32 gradients get
    torch.testing.assert_close(ours.grad.float(), reference.grad, rtol=1e-3, atol=1e-6)
    assert not clip_norm_in_fp32(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), 1.0)  # fp32: torch's


def test_training_state_bytes_count_each_tensor_in_its_dtype():
    torch.manual_seed(0)
    layer = nn.Linear(10, 10).bfloat16()  # 110 parameters
    adamw = optimi.AdamW(layer.parameters(), lr=1e-3, kahan_sum=True)
    layer(torch.randn(2, 10).bfloat16()).sum().backward()
    adamw.step()
    figures = training_state_bytes(layer, [adamw])
    assert figures["weights"] == figures["gradients"] == 220 and figures["compensation"] == 220
    assert figures["optimizer_state"] == 440  # two bf16 moments (the step counter is not counted)
    assert figures["fp32_total"] == 4 * (110 + 110 + 220) and figures["share_of_fp32"] == pytest.approx(1100 / 1760)
