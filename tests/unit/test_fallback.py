"""Filters, fp32 islands and the promotion rule, without a Trainer."""

import pytest
import torch
from torch import nn

from lightning_mp.fallback import (
    PromotionRule,
    apply_fp32,
    by_name,
    by_type,
    fp32,
    fp32_filter,
    is_fp32_island,
    pattern_misses,
    remove_fp32,
)


def model():
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)), nn.Softmax(dim=-1))


def selected(m, flt):
    return [fqn for fqn, mod in m.named_modules() if fqn and flt(mod, fqn)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (nn.LayerNorm, ["1.0"]),
        ("1.*", ["1.0", "1.1"]),
        (["0", nn.Softmax], ["0", "2"]),
        (lambda module, fqn: isinstance(module, nn.Linear), ["0", "1.1"]),
    ],
    ids=["class", "glob", "mixed-list", "filter"],
)
def test_fp32_filter_accepts_classes_globs_and_filters(spec, expected):
    assert selected(model(), fp32_filter(spec)) == expected


def test_helpers_build_the_same_filters():
    m = model()
    assert selected(m, by_type(nn.Linear)) == ["0", "1.1"]
    assert selected(m, by_name("1.?")) == ["1.0", "1.1"]


@pytest.mark.parametrize("bad", [3, 2.5, None], ids=["int", "float", "none"])
def test_bad_filter_entries_name_the_entry_and_what_is_allowed(bad):
    with pytest.raises(ValueError, match=rf"entry {bad!r} is invalid: expected an nn.Module class, an fqn glob"):
        fp32_filter([bad])


def test_helper_arguments_are_validated():
    with pytest.raises(ValueError, match="nn.Module subclasses"):
        by_type(int)
    with pytest.raises(ValueError, match="non-empty fqn glob"):
        by_name("")


def test_pattern_misses_lists_patterns_matching_nothing():
    assert pattern_misses(["1.*", "encoder.*", nn.Linear], model()) == ["encoder.*"]


def test_islands_run_fp32_inside_autocast_and_can_be_removed():
    torch.manual_seed(0)
    m = model()
    x = torch.randn(2, 4)
    assert apply_fp32(m, ["1.1"], "cpu") == ["1.1"]
    assert is_fp32_island(m[1][1]) and not is_fp32_island(m[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m[0](x).dtype == torch.bfloat16
        assert m[1][1](x.bfloat16()).dtype == torch.float32
    assert apply_fp32(m, ["1.1"], "cpu") == [], "applying twice is a no-op"
    assert remove_fp32(m) == ["1.1"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m[1][1](x).dtype == torch.bfloat16


def test_island_output_equals_fp32_module_output():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    expected = m(x)
    apply_fp32(m, lambda module, fqn: True, "cpu")  # the root is never selected
    assert not is_fp32_island(m)
    wrapper = nn.Sequential(m)
    apply_fp32(wrapper, ["0"], "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(wrapper(x.half()), m(x.half().float()))
    assert torch.allclose(wrapper(x), expected)


@pytest.mark.parametrize(
    ("steps", "promoted_at"),
    [([1, 2], 2), ([1, 50, 99], 50), ([1, 200, 400], None)],
    ids=["back-to-back", "within-window", "too-far-apart"],
)
def test_promotion_needs_repeated_blame_within_the_window(steps, promoted_at):
    rule = PromotionRule(promote_after=2, window=100)
    decisions = {step: rule.blame("layer", step) for step in steps}
    assert [s for s, promote in decisions.items() if promote] == ([promoted_at] if promoted_at else [])


def test_promotion_rule_validates_its_knobs():
    with pytest.raises(ValueError, match="promote_after=0"):
        PromotionRule(promote_after=0)
    with pytest.raises(ValueError, match="promote_window=-1"):
        PromotionRule(window=-1)


def test_fp32_region_turns_autocast_off_inside_and_back_on_after():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with fp32():
            assert not torch.is_autocast_enabled("cpu")
            inside = a @ b
        assert torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.bfloat16
    assert inside.dtype == torch.float32 and torch.equal(inside, a @ b), "the fp32 result, bit for bit"


def test_fp32_decorator_casts_its_tensor_arguments_and_runs_backward_in_fp32():
    @fp32()
    def logsumexp(x, extra):
        assert x.dtype == torch.float32 and extra["scale"].dtype == torch.float32
        return torch.log(torch.exp(x * extra["scale"]).sum(dim=-1))

    x = torch.full((2, 3), 4.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        low = x.half() * 1.0  # an fp16 activation arriving at the region
        out = logsumexp(low, {"scale": torch.tensor(8.0, dtype=torch.float16)})
    assert torch.isfinite(out).all(), "exp(32) overflows fp16 (65504) but not fp32"
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isinf(torch.log(torch.exp(low * 8.0).sum(dim=-1))).all(), "the same in fp16 overflows"


def test_fp32_decorates_a_function_without_parentheses_too():
    @fp32
    def matmul(a, b):
        return a @ b

    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul(a.bfloat16(), b).dtype == torch.float32
    assert matmul.__name__ == "matmul"
    with pytest.raises(TypeError, match=r"fp32\(3\) is invalid"):
        fp32(3)


def test_fp32_region_outside_autocast_changes_nothing():
    x = torch.randn(2, 2, dtype=torch.float64)
    with fp32():
        assert (x @ x).dtype == torch.float64
