"""AdaptiveLossScaler against torch.amp.GradScaler, step by step, plus the rules GradScaler does not have."""

import math
import pickle

import pytest
import torch
from torch import nn

from lightning_mp import AdaptiveLossScaler, LossScaleFloorError, ScalePolicy, ScalerConfig
from lightning_mp.options import GRADSCALER_RULE

INF, NAN = float("inf"), float("nan")
GRADSCALER_SETTINGS = GRADSCALER_RULE  # the one declaration (lightning_mp.options)


def classic(**kwargs):
    """An AdaptiveLossScaler configured to be GradScaler."""
    return AdaptiveLossScaler("cpu", **GRADSCALER_SETTINGS, **kwargs)


def train_step(model, optimizer, scaler, x, poison=None):
    """One hand-written AMP step; ``poison`` (inf/nan) replaces one gradient element to force an overflow."""
    optimizer.zero_grad()
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    if poison is not None:
        next(model.parameters()).grad.view(-1)[0] = poison
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def twin_runs(make_ours, make_ref, poisons, lr=0.1, **scaler_kwargs):
    """Run the same model and data under both scalers; yield both after every step."""
    torch.manual_seed(0)
    model_a = nn.Linear(4, 3)
    model_b = nn.Linear(4, 3)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.SGD(model_a.parameters(), lr=lr, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=lr, momentum=0.9)
    ours, ref = make_ours(**scaler_kwargs), make_ref(**scaler_kwargs)
    for step, poison in enumerate(poisons):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        train_step(model_a, opt_a, ours, x, poison)
        train_step(model_b, opt_b, ref, x, poison)
        yield ours, ref, model_a, model_b


def poison_pattern(steps, every, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        roll = torch.rand((), generator=gen).item()
        out.append((INF if roll < 0.5 else NAN) if i % every == 0 or roll < 0.15 else None)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"growth_interval": 3},
        {"growth_interval": 1, "init_scale": 2.0**100},
        {"growth_interval": 2, "growth_factor": 1.7, "backoff_factor": 0.3, "init_scale": 1234.5},
    ],
    ids=["powers-of-two", "growth-every-step", "non-power-of-two-factors"],
)
def test_dynamic_policy_reproduces_gradscaler_trajectory_and_weights(kwargs):
    poisons = poison_pattern(60, every=7)
    for step, (ours, ref, model_a, model_b) in enumerate(
        twin_runs(classic, lambda **kw: torch.amp.GradScaler("cpu", **kw), poisons, **kwargs)
    ):
        assert ours.get_scale() == ref.get_scale(), f"scale differs after step {step}"
        assert ours._get_growth_tracker() == ref._get_growth_tracker(), f"tracker differs after step {step}"
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b), f"weights differ after step {step}"
    assert ours.skipped_steps == sum(p is not None for p in poisons)


def test_growth_never_overflows_to_inf_like_gradscaler():
    ours = classic(init_scale=2.0**126, growth_interval=1)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=1)
    for _ in twin_runs(lambda **_: ours, lambda **_: ref, [None] * 6):
        pass
    assert ours.get_scale() == ref.get_scale() == 2.0**127
    assert math.isfinite(ours.get_scale())


def test_unscaled_gradients_equal_gradscalers():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    grads = []
    for scaler in (classic(init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)):
        model.zero_grad()
        scaler.scale(model(x).sum()).backward()
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    model(x).sum().backward()
    for ours, ref, plain in zip(*grads, [p.grad for p in model.parameters()]):
        assert torch.equal(ours, ref)
        torch.testing.assert_close(ours, plain)


def test_each_optimizer_is_skipped_on_its_own_overflow_only():
    torch.manual_seed(0)
    results = []
    for scaler in (classic(), torch.amp.GradScaler("cpu")):
        torch.manual_seed(0)
        a, b = nn.Linear(3, 1), nn.Linear(3, 1)
        opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
        before_a, before_b = a.weight.clone(), b.weight.clone()
        x = torch.randn(4, 3)
        scaler.scale(a(x).sum() + b(x).sum()).backward()
        b.weight.grad[0, 0] = INF
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        assert not torch.equal(a.weight, before_a), "the clean optimizer must step"
        assert torch.equal(b.weight, before_b), "the overflowing optimizer must not"
        results.append((scaler.get_scale(), a.weight.clone()))
    assert results[0][0] == results[1][0] == 2.0**15  # one back-off for the iteration, as GradScaler
    assert torch.equal(results[0][1], results[1][1])


def test_two_optimizers_overflowing_count_two_skipped_steps():
    scaler = classic()
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)]
    scaler.scale(a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
    a.weight.grad[0, 0] = NAN
    b.weight.grad[0, 0] = INF
    for opt in opts:
        scaler.step(opt)
    scaler.update()
    assert scaler.skipped_steps == 2
    assert scaler.policy.overflows == 1


def test_gradient_accumulation_scales_every_micro_batch_like_gradscaler():
    results = []
    for scaler in (classic(init_scale=512.0), torch.amp.GradScaler("cpu", init_scale=512.0)):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for micro in range(3):
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(micro))
            scaler.scale(model(x).square().mean() / 3).backward()
        scaler.step(opt)
        scaler.update()
        results.append(model.weight.clone())
    assert torch.equal(*results)


def test_clipping_after_unscale_matches_gradscaler():
    results = []
    for scaler in (classic(), torch.amp.GradScaler("cpu")):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler.scale(model(torch.randn(8, 4)).square().sum()).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        scaler.step(opt)
        scaler.update()
        results.append((norm, model.weight.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][0] < 1e3, "clipping must see unscaled gradients"
    assert torch.equal(results[0][1], results[1][1])


def test_state_dict_round_trip_restores_scale_and_counters():
    scaler = AdaptiveLossScaler("cpu", growth_interval=2)
    list(twin_runs(lambda **_: scaler, classic, [INF, None, None, NAN, INF, None, None, None]))
    state = scaler.state_dict()
    fresh = AdaptiveLossScaler("cpu", growth_interval=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.skipped_steps == scaler.skipped_steps == 3
    # and it goes on from there exactly like the original
    for s in (scaler, fresh):
        list(twin_runs(lambda s=s, **_: s, classic, [None, INF, None]))
    assert fresh.state_dict() == scaler.state_dict()


def test_loads_a_plain_gradscaler_state_dict():
    ref = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=7)
    ref.scale(torch.ones(()))
    ours = AdaptiveLossScaler("cpu")
    ours.load_state_dict(ref.state_dict())
    assert ours.get_scale() == 8.0
    assert ours.get_growth_interval() == ours.config.growth_interval == 7


def test_pickle_round_trip_keeps_state_and_drops_the_floor_hook():
    scaler = AdaptiveLossScaler("cpu", growth_interval=2, on_floor=lambda s: None)
    list(twin_runs(lambda **_: scaler, classic, [INF, None, None, None]))
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone.state_dict() == scaler.state_dict()
    assert clone.on_floor is None
    assert clone.scale(torch.ones(())).item() == scaler.get_scale()


# ------------------------------------------------------------------------------------ hysteresis
def drive(policy, pattern):
    """Feed a pattern of 'x' (overflow) and '.' (clean) to a policy; return the scale after each step."""
    scales = []
    for char in pattern:
        policy.update(char == "x", 1e-3 if char == "." else None)
        scales.append(policy.scale)
    return scales


@pytest.mark.parametrize(
    ("pattern", "backoffs"),
    [
        (".x.....x.....x", 0),  # isolated overflows further apart than the window: tolerated
        (".x..x", 1),  # second overflow within the window: back off once
        (".x.x.x.x", 2),  # every other step: windowed counting catches it (a consecutive counter never would)
        ("x", 1),  # a scale that never produced a clean step backs off at once
        ("xx", 2),  # start-up descent is as fast as GradScaler's
        (".x.xx", 2),  # after a back-off the new scale has not proven itself: no tolerance yet
        (".x.x...x", 1),  # ... once it has produced clean steps, an isolated overflow is tolerated again
    ],
    ids=["isolated", "two-in-window", "alternating", "first-step", "descent", "unproven", "proven"],
)
def test_hysteresis_counts_overflows_within_a_window(pattern, backoffs):
    policy = ScalePolicy(ScalerConfig(policy="dynamic", hysteresis=2, hysteresis_window=5, init_scale=1024.0))
    scales = drive(policy, pattern)
    assert policy.backoffs == backoffs
    assert scales[-1] == 1024.0 * 0.5**backoffs
    assert policy.skipped_steps == 0  # the policy never counts skips itself; the scaler does


def test_hysteresis_one_backs_off_on_every_overflow():
    policy = ScalePolicy(ScalerConfig(policy="dynamic", hysteresis=1, init_scale=1024.0))
    drive(policy, ".x.....x")
    assert policy.backoffs == 2


def test_tolerated_overflows_still_skip_the_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = AdaptiveLossScaler("cpu", policy="dynamic", hysteresis=3)
    train_step(model, opt, scaler, torch.randn(2, 4))
    before = [p.clone() for p in model.parameters()]
    train_step(model, opt, scaler, torch.randn(2, 4), poison=NAN)
    assert scaler.last_action == "tolerated"
    assert scaler.get_scale() == 2.0**16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.skipped_steps == 1


# -------------------------------------------------------------------------------------------- floor
@pytest.mark.parametrize(
    ("min_scale", "expected_floor"),
    [(1.0, 1.0), (None, float(torch.finfo(torch.float32).tiny))],
    ids=["min_scale", "none-means-smallest-normal"],
)
def test_scale_stops_at_floor_never_zero_or_subnormal(min_scale, expected_floor):
    policy = ScalePolicy(ScalerConfig(policy="dynamic", hysteresis=1, min_scale=min_scale, floor_patience=10**6))
    drive(policy, "x" * 300)
    assert policy.scale == expected_floor
    assert policy.scale >= torch.finfo(torch.float32).tiny and math.isfinite(policy.scale)
    # GradScaler has no floor: the same 300 back-offs drive its scale to exactly zero.
    ref = torch.amp.GradScaler("cpu")
    ref.scale(torch.ones(()))
    for _ in range(300):
        ref._per_optimizer_states[0]["found_inf_per_device"] = {torch.device("cpu"): torch.ones(())}
        ref.update()
    assert ref.get_scale() == 0.0


def floor_scaler(**kwargs):
    return AdaptiveLossScaler("cpu", init_scale=4.0, min_scale=1.0, floor_patience=3, hysteresis=1, **kwargs)


def overflow_forever(scaler, steps):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        train_step(model, opt, scaler, torch.ones(1, 2), poison=INF)


def test_floor_raises_a_clear_error_after_patience():
    scaler = floor_scaler()
    overflow_forever(scaler, 4)  # 4 -> 2 -> 1 -> floor hit 1 -> floor hit 2
    assert scaler.get_scale() == 1.0
    with pytest.raises(LossScaleFloorError, match="floor .*bf16-mixed.*fp32_modules"):
        overflow_forever(scaler, 1)


def test_floor_calls_the_escalation_hook_instead_of_raising():
    calls = []
    scaler = floor_scaler(on_floor=calls.append)
    overflow_forever(scaler, 5)
    assert calls == [scaler]
    assert scaler.get_scale() == 1.0


def test_a_clean_step_resets_the_floor_count():
    policy = ScalePolicy(ScalerConfig(init_scale=1.0, min_scale=1.0, floor_patience=2, hysteresis=1, calibrate=False))
    assert drive(policy, "x.x.x.x") and policy.floor_hits == 1


# ------------------------------------------------------------------------------------ predictive
def test_predictive_shrinks_ahead_of_a_rising_amax():
    config = ScalerConfig(
        init_scale=2.0**10, growth_interval=10**6, headroom_bits=1.0, shrink_headroom_bits=0.25, calibrate=False
    )
    policy = ScalePolicy(config)
    policy.overflow_product = 2.0**10 * 1e-2 * 1.5  # learned: S * amax overflows a little above this
    for a in (1e-3, 5e-3, 1e-2, 1.3e-2, 1.35e-2, 1.4e-2):  # creeping up towards P, never reaching it
        policy.update(False, a)
    assert policy.preemptive_backoffs >= 1
    assert policy.overflows == 0
    assert policy.scale < 2.0**10


def test_predictive_reverts_a_failed_growth_in_one_step():
    policy = ScalePolicy(ScalerConfig(init_scale=2.0**8, growth_interval=2, max_scale=2.0**24, calibrate=False))
    drive(policy, "..")  # amax 1e-3 leaves lots of headroom below 65504: jumps by several factors
    grown = policy.scale
    assert grown > 2.0**9
    drive(policy, "x")
    assert policy.scale == 2.0**8, "back to the last scale that worked, not half of the failed one"


def test_predictive_never_grows_past_the_format_limit():
    config = ScalerConfig(init_scale=1.0, growth_interval=1, max_scale=None)
    policy = ScalePolicy(config)
    for _ in range(50):
        policy.update(False, 0.5)
    assert (
        policy.scale * 0.5 * 2 ** config.growth_headroom(policy.rescuing) <= 65504.0
    )  # at least headroom_bits below fp16's max
    assert policy.scale * 0.5 * 2 > 65504.0, "and no further below than one growth factor"


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"growth_factor": 1.0}, r"growth_factor=1.0.*> 1"),
        ({"backoff_factor": 1.5}, r"backoff_factor=1.5.*\(0, 1\)"),
        ({"backoff_factor": 0}, r"backoff_factor=0.*\(0, 1\)"),
        ({"init_scale": -1.0}, r"init_scale=-1.0.*> 0"),
        ({"init_scale": INF}, r"init_scale=inf.*finite"),
        ({"growth_interval": 0}, r"growth_interval=0.*integer >= 1"),
        ({"growth_interval": 2.5}, r"growth_interval=2.5.*integer >= 1"),
        ({"policy": "magic"}, r"policy='magic'.*dynamic"),
        ({"hysteresis": 0}, r"hysteresis=0"),
        ({"min_scale": 4.0, "max_scale": 2.0}, r"min_scale=4.0, max_scale=2.0.*<="),
        ({"min_scale": 0.0}, r"min_scale=0.0.*> 0"),
        ({"max_scale": INF}, r"max_scale=inf"),
        ({"shrink_headroom_bits": 2.0}, r"shrink_headroom_bits=2.0.*< headroom_bits"),
        ({"device": 0}, r"device=0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_arguments_raise_naming_field_value_and_allowed(kwargs, match):
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        AdaptiveLossScaler(**kwargs)


def test_unknown_argument_lists_the_allowed_ones():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['hysterisis'\].*hysteresis"):
        AdaptiveLossScaler("cpu", hysterisis=2)
