"""The fixed host cost AdaptiveMP adds to a small, fast training step, in microseconds, on Hugging Face models.

A fast step shows what a slow one hides: per-step Python and kernel-launch work that does not shrink with the
model. Small GPT-2, BERT and ViT models (built from configs, nothing downloaded) train under Lightning's plugin
and under AdaptiveMP variants, interleaved round by round with the order rotating. "again" is the reference
against itself: the noise floor. Two figures per variant, each the median over rounds of (variant - reference):

- ``wall``: the median step time. Honest but noisy: on a shared machine the whole step's noise (+-0.05 of a
  7 ms step) is wider than the 2% budget.
- ``host``: the time per step spent *outside* the model's own work: the step minus ``training_step``, the
  ``backward`` call and ``optimizer.step``'s update (:class:`HostClock`). That is the Lightning loop, the precision
  plugin and the callbacks, where any fixed cost of AdaptiveMP lives; the statistics' hooks, which run inside
  the forward on sampled steps, are counted as host time too. Its noise is that of a ~1 ms region, not of the
  step, so ``est. ratio`` = 1 + (host difference) / (reference step time) resolves the budget. It assumes the
  plugin does not slow the model's own kernels (it adds none to them on steps that are not sampled).

    python -m benchmarks.step_cost            # 7 rounds x 60 steps, 1 thread
    python -m benchmarks.step_cost --quick    # smoke run
    python -m benchmarks.step_cost --pieces --models GPT-2   # where it goes, piece by piece (300 steps)
    python -m benchmarks.step_cost --paired                  # against Lightning and the guard, step by step
    python -m benchmarks.step_cost --paired --fits 5         # the headline: the median over five fresh fits
    python -m benchmarks.step_cost --paired --option stats_every=25    # the same with other knobs

``--paired`` measures what the host split cannot: the *marginal* cost of the non-finite guard. A piece's own
time overstates it when the piece is the first torch call after the backward, because that call pays for
caches the backward left cold, which the optimizer would pay otherwise. So one AdaptiveMP fit runs with the
guard on even steps and a guard that answers "finite" without looking on odd ones; each step's wall time is
compared with its neighbours' (the median of on-minus-off over adjacent pairs), as is a fit whose odd steps
run the same real guard (the noise floor). Neighbouring steps share the process, its memory layout and the
machine's load of the moment, which dominate the spread between separate fits.

``--pieces`` answers "where does it go?" one level down: every hook of the precision plugin, every step of
its core, the guard, the statistics and each callback, timed exclusively (a piece's time excludes the pieces
and the model work it calls), in microseconds per step, for Lightning's plugin and for AdaptiveMP's defaults.

On a CPU without native bf16 (AVX512-BF16/AMX) the rows run in fp32 ("32-true" against Lightning's
``Precision``): the plugin's per-step work (guard, input check, bookkeeping) is the same, and emulated bf16
kernels would bury it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import statistics
import time
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision, Precision
from lightning.pytorch.plugins.precision import Precision as BasePrecision
from torch.utils.data import DataLoader

from benchmarks.overhead import timed_fit
from lightning_mp import AdaptiveMP
from lightning_mp.diagnosis import hooks
from lightning_mp.formats import cpu_has_native_bf16


def models() -> dict:
    import transformers

    return {
        "GPT-2": (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2)
            ),
            "tokens",
        ),
        "BERT": (
            lambda: transformers.BertForSequenceClassification(
                transformers.BertConfig(
                    vocab_size=512,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=128,
                    max_position_embeddings=64,
                    num_labels=4,
                )  # fmt: skip
            ),
            "labels",
        ),
        "ViT": (
            lambda: transformers.ViTForImageClassification(
                transformers.ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=128,
                    num_labels=4,
                )  # fmt: skip
            ),
            "pixels",
        ),
    }


def batches(kind: str, n: int, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        if kind == "pixels":
            out.append({"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=gen),
                        "labels": torch.randint(0, 4, (batch_size,), generator=gen)})  # fmt: skip
        else:
            ids = torch.randint(0, 512, (batch_size, 32), generator=gen)
            labels = ids if kind == "tokens" else torch.randint(0, 4, (batch_size,), generator=gen)
            out.append({"input_ids": ids, "labels": labels})
    return DataLoader(out, batch_size=None)


class HFTask(L.LightningModule):
    def __init__(self, make_model) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


PLUGIN_HOOKS = ("convert_input", "pre_backward", "backward", "post_backward", "optimizer_step", "clip_gradients")
CALLBACK_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                  "on_before_zero_grad", "on_train_batch_end")  # fmt: skip
PARTS = ("lightning", "plugin", "callbacks", "stats hooks")  # host time
MODEL_PARTS = ("forward+backward", "optimizer")  # the model's own work, reported beside it


class RegionClock(L.Callback):
    """Charges wall time to the innermost open region: ``region(label, fn)`` wraps a callable, ``context``
    a context-manager method; ``totals`` holds seconds per label, ``first`` is charged when no region is open."""

    def __init__(self, first: str, totals: dict[str, float]) -> None:
        self.totals = totals
        self._stack = [first]
        self._last = time.perf_counter()

    def _switch(self, push: str | None) -> None:
        now = time.perf_counter()
        self.totals[self._stack[-1]] += now - self._last
        self._last = now
        self._stack.pop() if push is None else self._stack.append(push)

    def _catch_up(self, label: str) -> None:
        """Bring the totals up to now, charging the time since the last switch to ``label``."""
        self._switch(label)
        self._switch(None)

    def region(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._switch(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self._switch(None)

        return timed

    def hook_register(self, register, label: str):
        """``HookSet.register`` (the function ``register``) with every hook it builds timed as ``label``. One
        wrapper per make_hook: a dispatching HookSet keeps its table only while make_hook is the same object."""
        wrapped = {}

        def timed_register(hook_set, model, make_hook, kind):
            if make_hook not in wrapped:
                wrapped[make_hook] = lambda fqn: self.region(label, make_hook(fqn))
            register(hook_set, model, wrapped[make_hook], kind)

        return timed_register

    def context(self, label: str, make_context, body: str | None = None):
        """A context manager method whose entry and exit count as ``label``; its body counts as ``body``, or as
        whatever encloses it when ``body`` is None."""
        clock = self

        @contextlib.contextmanager
        def timed(*args, **kwargs):
            context = make_context(*args, **kwargs)
            clock.region(label, context.__enter__)()
            if body is not None:
                clock._switch(body)
            try:
                yield
            except BaseException as error:
                if body is not None:
                    clock._switch(None)
                if not clock.region(label, context.__exit__)(type(error), error, error.__traceback__):
                    raise
            else:
                if body is not None:
                    clock._switch(None)
                clock.region(label, context.__exit__)(None, None, None)

        return timed


class HostClock(RegionClock):
    """Time per training step spent outside the model's own work, in seconds, split by where it goes.

    Time is charged to the innermost open region: "forward+backward" inside ``training_step`` and the
    LightningModule's ``backward``, "optimizer" inside the optimizer's ``step`` (the model's own work, not host
    time); "plugin" inside the precision plugin's step hooks
    (``PLUGIN_HOOKS``, ``train_step_context``'s entry and exit, Lightning's closure wrapper inside ``step``);
    "callbacks" inside lightning_mp callbacks' step hooks; "stats hooks" inside every hook of a lightning_mp
    HookSet (sampled steps); "lightning" everywhere else: the loop, the data fetch, hook dispatch. A step runs
    from one ``on_train_batch_start`` to the next (to the end of fit for the last). ``per_step`` holds one
    ``{part: seconds}`` per step, host ``PARTS`` and ``MODEL_PARTS``.
    """

    def __init__(self) -> None:
        super().__init__("lightning", dict.fromkeys(PARTS + MODEL_PARTS, 0.0))
        self.per_step: list[dict[str, float]] = []
        self._register = hooks.HookSet.register

    def setup(self, trainer, pl_module, stage):
        pl_module.training_step = self.region("forward+backward", pl_module.training_step)
        pl_module.backward = self.region("forward+backward", pl_module.backward)
        plugin = trainer.precision_plugin
        for name in PLUGIN_HOOKS:
            setattr(plugin, name, self.region("plugin", getattr(plugin, name)))
        plugin._wrap_closure = self.region("plugin", plugin._wrap_closure)  # Lightning runs it inside step()
        plugin.train_step_context = self.context("plugin", plugin.train_step_context, body="lightning")
        hooks.HookSet.register = self.hook_register(self._register, "stats hooks")

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            optimizer.step = self.region("optimizer", optimizer.step)
        for callback in trainer.callbacks:  # attached by the plugin at setup: wrapped here, after it
            if type(callback).__module__.startswith("lightning_mp"):
                for name in CALLBACK_HOOKS:
                    if callable(getattr(callback, name)):  # an unused hook is None: Lightning skips it
                        setattr(callback, name, self.region("callbacks", getattr(callback, name)))

    def _close_step(self) -> None:
        self._catch_up("lightning")
        self.per_step.append(self.totals)
        self.totals = dict.fromkeys(PARTS + MODEL_PARTS, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close_step()

    def on_train_end(self, trainer, pl_module):
        self._close_step()

    def teardown(self, trainer, pl_module, stage):
        hooks.HookSet.register = self._register
        for name in ("training_step", "backward"):
            pl_module.__dict__.pop(name, None)

    def on_exception(self, trainer, pl_module, exception):
        hooks.HookSet.register = self._register  # a failed fit does not reach the callbacks' teardown


# The core's steps in the order a step calls them, and the collaborators' pieces worth a line of their own.
CORE_PIECES = ("keep_micro_batch", "observe_input", "begin_micro_batch", "training_context", "scale_loss",
               "run_closure", "_unscale", "collect_statistics", "_end_step")  # fmt: skip
COLLABORATOR_PIECES = (("guard", "step_or_skip", "step or skip (guard.step_or_skip)"),
                       ("replay", "begin_batch", "RNG snapshot (replay.begin_batch)"),
                       ("buffers", "take", "buffer snapshot (buffers.take)"),
                       ("tracker", "new_batch", "tracker.new_batch"), ("tracker", "end_step", "tracker.end_step"),
                       ("statistics", "start", "statistics: arm (start)"),
                       ("statistics", "collect", "statistics: collect"),
                       ("ledger", "start_step", "ledger.start_step"),
                       ("decisions", "after_step", "decisions (after the step)"))  # fmt: skip


class PieceClock(RegionClock):
    """Exclusive time per step of each piece of the precision plugin, in seconds (``--pieces``).

    Every wrapped piece pushes its label while it runs, so its time excludes whatever wrapped piece or model
    work it calls: ``training_step``, ``backward`` and ``optimizer.step`` are "model"; Lightning's closure around
    them and its ``_after_closure`` are Lightning's; the rest of the loop is "lightning (loop)". ``totals``
    holds the seconds of each label after ``warmup`` steps, ``steps`` how many steps that covers.
    """

    def __init__(self, warmup: int = 5) -> None:
        super().__init__("lightning (loop)", defaultdict(float))
        self.warmup, self.steps = warmup, 0
        self._undo: list = []

    def _patch(self, owner, name: str, label: str) -> None:
        setattr(owner, name, self.region(label, getattr(owner, name)))

    def _patch_class(self, owner, name: str, replacement) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    def setup(self, trainer, pl_module, stage):
        for name in ("training_step", "backward"):
            self._patch(pl_module, name, "model")
        plugin = trainer.precision_plugin
        for name in ("convert_input", "pre_backward", "clip_gradients"):
            self._patch(plugin, name, f"plugin.{name}")
        plugin.train_step_context = self.context("plugin.train_step_context", plugin.train_step_context)
        step, clock = plugin.optimizer_step, self

        def optimizer_step(optimizer, model, closure, **kwargs):
            return step(optimizer, model, clock.region("lightning (closure)", closure), **kwargs)

        plugin.optimizer_step = self.region("plugin.optimizer_step", optimizer_step)
        after = BasePrecision._after_closure
        self._patch_class(BasePrecision, "_after_closure", self.region("lightning (_after_closure)", after))
        core = getattr(plugin, "core", None)
        if core is None:
            return
        for name in CORE_PIECES:
            self._patch(core, name, f"core.{name}")
        if hasattr(core.stepper, "guard"):  # bf16 / fp32: the non-finite check
            self._patch(core.stepper, "guard", "guard")
        for owner, name, label in COLLABORATOR_PIECES:
            self._patch(getattr(core, owner), name, label)
        self._patch_class(hooks.HookSet, "register", self.hook_register(hooks.HookSet.register, "statistics: hooks"))
        # The statistics' one global hook dispatches to those hooks: its own work is theirs too. (The slower
        # module-call path any hook forces stays inside "model".)
        module_hooks = torch.nn.modules.module
        register_global = module_hooks.register_module_forward_hook

        def timed_global(hook, **kwargs):
            return register_global(clock.region("statistics: hooks", hook), **kwargs)

        self._patch_class(module_hooks, "register_module_forward_hook", timed_global)

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            self._patch(optimizer, "step", "model")
        for callback in trainer.callbacks:
            if type(callback).__module__.startswith("lightning_mp"):
                for name in CALLBACK_HOOKS:
                    if callable(getattr(callback, name)):  # an unused hook is None: Lightning skips it
                        self._patch(callback, name, f"callback {type(callback).__name__}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self._catch_up("lightning (loop)")
            self.totals.clear()
        self.steps += batch_idx >= self.warmup

    def on_train_end(self, trainer, pl_module):
        self._catch_up("lightning (loop)")

    def teardown(self, trainer, pl_module, stage):
        self._put_back()
        for name in ("training_step", "backward"):
            pl_module.__dict__.pop(name, None)

    def on_exception(self, trainer, pl_module, exception):
        self._put_back()  # a failed fit does not reach the callbacks' teardown

    def _put_back(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def pieces(make_model, kind: str, variants: dict, steps: int, warmup: int = 5) -> dict[str, dict[str, float]]:
    """``{variant: {piece: microseconds per step}}``, one fit per variant."""
    out = {}
    for name, make_plugin in variants.items():
        torch.manual_seed(0)
        clock = PieceClock(warmup)
        timed_fit(make_plugin(), HFTask(make_model), batches(kind, steps + warmup), steps + warmup, callbacks=[clock])
        out[name] = {piece: seconds / clock.steps * 1e6 for piece, seconds in clock.totals.items()}
    return out


def print_pieces(model_name: str, table: dict[str, dict[str, float]]) -> None:
    reference, ours = table.values()
    outside = [p for p in ours if p != "model"]
    print(f"  {model_name}: us per step, exclusive ({' / '.join(table)}); model work {reference.get('model', 0):.0f}"
          f" / {ours.get('model', 0):.0f}")  # fmt: skip
    for piece in sorted(set(outside) | (set(reference) - {"model"}), key=lambda p: -ours.get(p, 0.0)):
        print(f"    {piece:44} {reference.get(piece, 0.0):7.1f} {ours.get(piece, 0.0):7.1f}")
    total_ref = sum(v for p, v in reference.items() if p != "model")
    total_ours = sum(ours[p] for p in outside)
    print(f"    {'outside the model, in all':44} {total_ref:7.1f} {total_ours:7.1f}  ({total_ours - total_ref:+.0f})")


class AlternateGuard(L.Callback):
    """Runs AdaptiveMP's real guard on even steps and ``odd_guard`` on odd ones; keeps every step's wall time."""

    def __init__(self, odd_guard) -> None:
        self.odd_guard = odd_guard
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now
        stepper = trainer.precision_plugin.core.stepper
        stepper.__dict__.setdefault("_real_guard", stepper.guard)
        stepper.guard = stepper._real_guard if batch_idx % 2 == 0 else self.odd_guard(stepper._real_guard)

    def teardown(self, trainer, pl_module, stage):
        stepper = trainer.precision_plugin.core.stepper
        stepper.guard = stepper.__dict__.pop("_real_guard", stepper.guard)


PLUGIN_STEP_HOOKS = ("convert_input", "train_step_context", "forward_context", "pre_backward", "optimizer_step",
                     "clip_gradients")  # fmt: skip


class AlternatePlugin(L.Callback):
    """Odd steps of an AdaptiveMP fit run as Lightning's plugin: ``reference``'s step hooks stand in for the
    plugin's, the strategy's ``training_step`` runs unwrapped and AdaptiveMP's callbacks leave the Trainer for
    the step. The core sees nothing of those steps. Keeps every step's wall time and whether the core sampled
    statistics on it."""

    def __init__(self, reference, same: bool = False) -> None:
        self.reference, self.same = reference, same  # same: every step is AdaptiveMP's (the noise floor)
        self.times: list[float] = []
        self.sampled: list[bool] = []
        self._start: float | None = None
        self._ours: list = []

    def on_train_start(self, trainer, pl_module):
        self._ours = [cb for cb in trainer.callbacks if type(cb).__module__ == "lightning_mp.reporting.callbacks"]
        self._ours = [cb for cb in self._ours if type(cb).__name__ != "PrecisionReport"]  # the reference has one
        self._wrapper = trainer.strategy.__dict__["training_step"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now
        plugin, strategy = trainer.precision_plugin, trainer.strategy
        upcoming = plugin.core.ledger.optimizer_steps + 1  # counted before its forward, which samples on it
        self.sampled.append(upcoming % plugin.core.stats_every == 0)  # if this step is ours
        others = [cb for cb in trainer.callbacks if cb not in self._ours]
        if batch_idx % 2 == 0 or self.same:
            for name in PLUGIN_STEP_HOOKS:
                plugin.__dict__.pop(name, None)
            strategy.training_step = self._wrapper
            trainer.callbacks = others[: len(others) - 1] + self._ours + others[-1:]  # a new list: the loop
        else:  # that is running now keeps iterating the old one
            for name in PLUGIN_STEP_HOOKS:
                setattr(plugin, name, getattr(self.reference, name))
            strategy.training_step = type(strategy).training_step.__get__(strategy)
            trainer.callbacks = others

    def teardown(self, trainer, pl_module, stage):
        for name in PLUGIN_STEP_HOOKS:
            trainer.precision_plugin.__dict__.pop(name, None)


def paired_plugin_cost(
    make_model, kind: str, precision: str, reference, steps: int, warmup: int = 10, noise: bool = True, **options
) -> dict:
    """AdaptiveMP against Lightning's plugin on adjacent steps of one fit, in microseconds per step: the median
    of (ours - Lightning's) over adjacent pairs (the fixed cost), the sampled statistics steps' excess over
    that, amortized at the default cadence, and (``noise``) the same pairing with AdaptiveMP on every step."""
    out = {}
    for name, same in (("plugin", False), ("again", True))[: 2 if noise else 1]:
        torch.manual_seed(0)
        clock, plugin = AlternatePlugin(reference(), same=same), AdaptiveMP(precision, **options)
        timed_fit(plugin, HFTask(make_model), batches(kind, steps + warmup), steps + warmup,
                  callbacks=[clock])  # fmt: skip
        out[f"{name}_counted"] = plugin.optimizer_steps  # the steps AdaptiveMP ran, of steps + warmup
        times, sampled = clock.times[warmup:], clock.sampled[warmup : warmup + len(clock.times[warmup:])]
        ours = [(t, s) for i, (t, s) in enumerate(zip(times, sampled)) if i % 2 == warmup % 2]
        theirs = [t for i, t in enumerate(times) if i % 2 != warmup % 2]
        pairs = [a - b for (a, s), b in zip(ours, theirs) if not s] + [
            a - b for (a, s), b in zip(ours[1:], theirs) if not s
        ]
        fixed = statistics.median(pairs)
        base = statistics.median(theirs)
        excess = [t - base - fixed for t, s in ours if s]
        out[name] = fixed * 1e6
        # A sample costs about the same every time: the median resists the one step a machine hiccup hit.
        out[f"{name}_sampling"] = statistics.median(excess) * len(excess) / len(ours) * 1e6 if excess else 0.0
        out["step_ms"] = base * 1e3
    return out


def paired_guard_cost(
    make_model, kind: str, precision: str, steps: int, warmup: int = 10, **options
) -> dict[str, float]:
    """Median of (guard on - guard off) over adjacent steps of one fit, and the same with the real guard on
    both (the noise floor), in microseconds; plus the median step time in milliseconds."""
    out = {}
    for name, odd_guard in (("guard", lambda real: lambda *args: False), ("again", lambda real: real)):
        torch.manual_seed(0)
        clock = AlternateGuard(odd_guard)
        timed_fit(AdaptiveMP(precision, **options), HFTask(make_model), batches(kind, steps + warmup), steps + warmup,
                  callbacks=[clock])  # fmt: skip
        times = clock.times[warmup:]  # times[j] is step warmup + j; the real guard runs on even steps
        on = [t for j, t in enumerate(times) if (warmup + j) % 2 == 0]
        off = [t for j, t in enumerate(times) if (warmup + j) % 2 == 1]
        pairs = [a - b for a, b in zip(on, off)] + [a - b for a, b in zip(on[1:], off)]  # each off step's two sides
        out[name] = statistics.median(pairs) * 1e6
        out["step_ms"] = statistics.median(times) * 1e3
    return out


def _option(text: str) -> tuple[str, object]:
    """``"stats_every=100"`` -> ``("stats_every", 100)``: the value as a Python literal, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--option {text!r} is invalid: write KEY=VALUE, e.g. --option stats_every=100")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def step_time(make_plugin, make_model, kind: str, steps: int, warmup: int = 5) -> tuple[float, dict[str, float]]:
    """Median wall time per step, and mean host time per step by part, after the warm-up (the mean keeps the
    sampled steps' share)."""
    torch.manual_seed(0)
    module = HFTask(make_model)
    clock = HostClock()
    times = timed_fit(make_plugin(), module, batches(kind, steps + warmup), steps + warmup, callbacks=[clock])
    steps_after = clock.per_step[warmup + 1 :]  # per_step[0] is the time before the first step
    return statistics.median(times[warmup:]), {
        p: statistics.fmean(s[p] for s in steps_after) for p in PARTS + MODEL_PARTS
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=None, help="rows to run, e.g. --models GPT-2")
    parser.add_argument("--pieces", action="store_true", help="time each piece of the plugin instead (300 steps)")
    parser.add_argument("--paired", action="store_true", help="the guard's marginal cost, adjacent steps (600)")
    parser.add_argument(
        "--fits",
        type=int,
        default=1,
        help="--paired: fits per model (the cost moves from fit to fit more than within one)",
    )
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an AdaptiveMP argument for --paired, e.g. --option stats_every=100")  # fmt: skip
    args = parser.parse_args(argv)
    options = dict(_option(text) for text in args.option)
    if args.quick:
        args.rounds, args.steps = 2, 10
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16()
    precision = "bf16-mixed" if bf16 else "32-true"
    reference = (lambda: MixedPrecision("bf16-mixed", "cpu")) if bf16 else Precision
    variants = {
        "reference": reference,
        "again": reference,
        "AdaptiveMP default": lambda: AdaptiveMP(precision),
        "AdaptiveMP guard off": lambda: AdaptiveMP(precision, guard_nonfinite=False),
        "AdaptiveMP stats off": lambda: AdaptiveMP(precision, stats="off"),
    }
    names = list(variants)
    ref_name = "Lightning MixedPrecision bf16" if bf16 else "Lightning Precision fp32"
    if args.paired:
        steps = 40 if args.quick else 600
        what = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
        print(f"{precision}: adjacent steps of one fit, {steps} steps: AdaptiveMP ({what}) against {ref_name}"
              " (odd steps), and its guard against a guard that does not look")  # fmt: skip
        rows = []
        for model_name, (make_model, kind) in models().items():
            if args.models is None or model_name in args.models:
                fits = []
                for fit in range(args.fits):
                    row = {"model": model_name, **paired_plugin_cost(make_model, kind, precision, reference, steps,
                                                                     noise=fit == 0, **options)}  # fmt: skip
                    row["total"] = total = row["plugin"] + row["plugin_sampling"]
                    row["ratio"] = 1 + total / row["step_ms"] / 1e3
                    noise = f" | noise floor {row['again']:+.1f}" if "again" in row else ""
                    print(f"  {model_name:6} step {row['step_ms']:.2f} ms | AdaptiveMP {total:+6.1f} us, ratio"
                          f" {row['ratio']:.4f} (fixed {row['plugin']:+.1f}, sampled statistics"
                          f" {row['plugin_sampling']:+.1f}){noise}", flush=True)  # fmt: skip
                    fits.append(row)
                row = dict(fits[0], fits=fits)
                if args.fits > 1:
                    ratios = sorted(f["ratio"] for f in fits)
                    row["ratio"] = statistics.median(ratios)
                    extra = statistics.median(f["total"] for f in fits)
                    print(f"  {model_name:6} median of {args.fits} fits: ratio {row['ratio']:.4f}"
                          f" (from {ratios[0]:.4f} to {ratios[-1]:.4f}), {extra:+.1f} us", flush=True)  # fmt: skip
                rows.append(row)
                if not options.get("guard_nonfinite", True):
                    continue
                if args.fits > 1:
                    continue  # the guard's own pairing: without --fits
                guard = paired_guard_cost(make_model, kind, precision, steps, **options)
                row.update({"guard": guard["guard"], "guard_again": guard["again"]})
                print(f"  {model_name:6} guard {row['guard']:+6.1f} us ({row['guard'] / row['step_ms'] / 1e3:+.4f})"
                      f" | noise floor {row['guard_again']:+.1f}", flush=True)  # fmt: skip
        return rows
    if args.pieces:
        steps = 30 if args.quick else 300
        print(f"{precision}: {ref_name} / AdaptiveMP default, {steps} steps, {args.threads} thread(s)")
        tables = {}
        for model_name, (make_model, kind) in models().items():
            if args.models is None or model_name in args.models:
                pair = {"reference": reference, "AdaptiveMP": variants["AdaptiveMP default"]}
                tables[model_name] = pieces(make_model, kind, pair, steps)
                print_pieces(model_name, tables[model_name])
        return [{"model": m, "pieces": t} for m, t in tables.items()]
    print(f"{precision} against {ref_name}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s)")
    rows = []
    for model_name, (make_model, kind) in models().items():
        if args.models is not None and model_name not in args.models:
            continue
        diffs: dict[str, list[float]] = {n: [] for n in names[1:]}
        ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        host_diffs: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PARTS + MODEL_PARTS} for n in names[1:]}
        base, base_host = [], []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            times = {n: step_time(variants[n], make_model, kind, args.steps) for n in order}
            (wall, host) = times["reference"]
            base.append(wall)
            base_host.append(sum(host[p] for p in PARTS))
            for n in names[1:]:
                diffs[n].append(times[n][0] - wall)
                ratios[n].append(times[n][0] / wall)
                for p in PARTS + MODEL_PARTS:
                    host_diffs[n][p].append(times[n][1][p] - host[p])
        step_ms, host_ms = statistics.median(base) * 1e3, statistics.median(base_host) * 1e3
        print(f"  {model_name}: reference step {step_ms:.2f} ms, of which {host_ms:.2f} ms outside the model")
        for n in names[1:]:
            diff_us = statistics.median(diffs[n]) * 1e6
            ratio = statistics.median(ratios[n])
            parts_us = {p: statistics.median(host_diffs[n][p]) * 1e6 for p in PARTS + MODEL_PARTS}
            host_us = statistics.median([sum(d) for d in zip(*(host_diffs[n][p] for p in PARTS))]) * 1e6
            estimate = 1 + host_us / (step_ms * 1e3)
            rows.append({"model": model_name, "variant": n, "step_ms": step_ms, "us": diff_us, "ratio": ratio,
                         "host_us": host_us, "estimate": estimate, "parts_us": parts_us})  # fmt: skip
            split = " ".join(f"{p} {parts_us[p]:+.0f}" for p in PARTS)
            model = " ".join(f"{p} {parts_us[p]:+.0f}" for p in MODEL_PARTS)
            print(
                f"  {model_name:6} {n:22} wall {diff_us:+7.0f} us ratio {ratio:.3f} | host {host_us:+6.0f} us"
                f" est. ratio {estimate:.3f} ({split}) | model's own work: {model}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
