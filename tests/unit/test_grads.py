"""The bf16/fp32 guard's check: every non-finite gradient found, every gradient left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from lightning_mp._grads import NonfiniteGuard, gradients_nonfinite


def optimizer_with(grads: list[torch.Tensor]) -> torch.optim.Optimizer:
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, layout=grad.layout))
        param.grad = grad
        params.append(param)
    return torch.optim.SGD(params, lr=0.1)


def grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=gen),
        torch.randn(5, generator=gen).to(torch.bfloat16),  # a second dtype: its own kernel call
        torch.randn(2, 2, generator=gen) * 1e-40,  # subnormals must survive the factor of one
        torch.tensor([-0.0, 3.0e38]),
    ]


def test_finite_gradients_pass_and_are_left_bit_for_bit():
    original = grads()
    optimizer = optimizer_with([g.clone() for g in original])
    assert gradients_nonfinite(optimizer) is False
    after = [p.grad for p in optimizer.param_groups[0]["params"]]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(after, original, strict=True))


@pytest.mark.parametrize("where", [0, 1, 3])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_any_nonfinite_element_in_any_dtype_is_found(where, bad):
    values = grads()
    values[where].view(-1)[-1] = bad
    assert gradients_nonfinite(optimizer_with(values)) is True


def test_sparse_gradients_are_checked_by_their_values():
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, float("nan")]), (4,))
    assert gradients_nonfinite(optimizer_with([torch.ones(2), sparse])) is True
    clean = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,))
    assert gradients_nonfinite(optimizer_with([clean])) is False


def test_one_guard_kept_across_steps_answers_each_step_afresh():
    """The guard keeps its flag between steps (a torch call saved per step): a bad step must not leave it set."""
    guard = NonfiniteGuard()
    bad = grads()
    bad[0][0, 0] = float("nan")
    answers = [guard(optimizer_with(values)) for values in (grads(), bad, grads(), bad, bad, grads())]
    assert answers == [False, True, False, True, True, False]


def test_a_check_that_raised_leaves_no_flag_behind(monkeypatch):
    import lightning_mp._grads as grads_module

    guard = NonfiniteGuard()
    real = grads_module.foreach_non_finite_check_and_unscale_

    def set_the_flag_then_fail(tensors, found_inf, inv_scale):
        found_inf.fill_(1.0)
        raise RuntimeError("the kernel failed half way")

    monkeypatch.setattr(grads_module, "foreach_non_finite_check_and_unscale_", set_the_flag_then_fail)
    with pytest.raises(RuntimeError, match="half way"):
        guard(optimizer_with(grads()))
    monkeypatch.setattr(grads_module, "foreach_non_finite_check_and_unscale_", real)
    assert guard(optimizer_with(grads())) is False
