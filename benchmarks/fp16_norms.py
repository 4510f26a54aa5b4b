"""Which norms and softmaxes overflow or lose accuracy under CPU fp16 autocast, and what an fp32 island changes.

``DEFAULT_FP32_MODULES["16-mixed"]`` ran LayerNorm, GroupNorm, InstanceNorm*, Softmax and LogSoftmax as fp32
islands; after this measurement it runs LayerNorm and LogSoftmax only (see the comment there). This measures,
on this CPU, what each of those (and BatchNorm2d, RMSNorm, scaled_dot_product_attention) does under
``torch.autocast("cpu", dtype=torch.float16)`` with inputs whose largest magnitude sweeps 1 ... 6e4 (fp16's
largest finite value is 65504):

* the autocast policy of this torch build: which of these ops have a kernel registered for AutocastCPU and for
  AutocastCUDA (read from the dispatcher, so it holds for this exact version even without a GPU);
* per module and input magnitude, three ways of running it: an fp16 input (the output of an fp16 Linear or
  conv) without an island, the same fp16 input through the package's island (``apply_fp32``), and an fp32 input
  without an island (a norm that autocast does not list runs in its input's dtype). For each: whether the
  output, the input gradient or a parameter gradient is non-finite, their errors against the same module in
  fp64 on the same input values and upstream gradient, and the output dtype. An error is
  ``max|got - fp64| / max|fp64|``; an fp16 output cannot do better than about 5e-4 (its rounding);
* parameter gradients against the size of the upstream gradient (a loss-scaled backward), where the CPU
  LayerNorm kernel accumulates dgamma/dbeta in a buffer of the input's dtype;
* LogSoftmax over a language model's vocabulary (32k ... 256k classes): the CPU kernel keeps each row's sum of
  exponentials in the input's dtype, so fp16 logits that are near-equal (a head at initialization) give -inf
  once the vocabulary passes 65504;
* what does overflow: the fp16 cast of the input itself, a hand-written variance or softmax, a LayerNorm with a
  large learned gain;
* the island's cost on this CPU: forward + backward of the module on an fp16 input against the island (cast in,
  fp32 module, the next layer's cast back to fp16), one thread, median of the rounds.

One thread (the CPU LayerNorm backward keeps one gradient buffer per thread). InstanceNorm2d is built with
``affine=True`` (not its default) so that its parameter gradients are checked too. Takes under 10 s.

    python -m benchmarks.fp16_norms
    python -m benchmarks.fp16_norms --rounds 3        # fewer timing rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mp.fallback.islands import apply_fp32

FP16_MAX = torch.finfo(torch.float16).max  # 65504
MAGNITUDES = (1.0, 16.0, 256.0, 1e3, 4e3, 1.6e4, 3e4, 6e4)


class SDPA(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v)`` with the swept input as the queries (keys and values fixed,
    unit scale): a softmax inside a fused kernel, out of any module island's reach (not in the defaults)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        # fp16-representable, so that every variant and the fp64 reference attend over the same keys and values
        self.register_buffer("k", torch.randn(8, 4, 64, 64, generator=g).half().float())
        self.register_buffer("v", torch.randn(8, 4, 64, 64, generator=g).half().float())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self.k.to(q.dtype), self.v.to(q.dtype))


# name -> (module factory, input shape)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "LayerNorm(512)": (lambda: nn.LayerNorm(512), (8, 64, 512)),
    "GroupNorm(8,64)": (lambda: nn.GroupNorm(8, 64), (8, 64, 16, 16)),
    "InstanceNorm2d(64)": (lambda: nn.InstanceNorm2d(64, affine=True), (8, 64, 16, 16)),
    "BatchNorm2d(64)": (lambda: nn.BatchNorm2d(64), (8, 64, 16, 16)),
    "RMSNorm(512)": (lambda: nn.RMSNorm(512), (8, 64, 512)),
    "Softmax(-1)": (lambda: nn.Softmax(-1), (8, 4, 64, 64)),
    "LogSoftmax(-1)": (lambda: nn.LogSoftmax(-1), (64, 32000)),
    "SDPA": (SDPA, (8, 4, 64, 64)),
}

# ops whose autocast registration decides what these modules do (the modules' functional calls)
AUTOCAST_OPS = (
    "layer_norm",
    "native_layer_norm",
    "group_norm",
    "instance_norm",
    "batch_norm",
    "rms_norm",
    "softmax.int",
    "_softmax",
    "log_softmax.int",
    "scaled_dot_product_attention",
    "pow.Tensor_Scalar",
    "mul.Tensor",
    "exp",
    "sum",
    "mean",
)


def autocast_registrations() -> list[tuple[str, bool, bool]]:
    """(op, has an AutocastCPU kernel, has an AutocastCUDA kernel) from this build's dispatcher.

    An op without a kernel for the key falls through: it runs in whatever dtype its inputs have."""
    rows = []
    for op in AUTOCAST_OPS:
        try:
            dump = torch._C._dispatch_dump(f"aten::{op}")  # private, but the only way to ask without a GPU
        except (AttributeError, RuntimeError):
            continue
        keys = {line.split(":")[0] for line in dump.splitlines()}
        rows.append((op, "AutocastCPU" in keys, "AutocastCUDA" in keys))
    return rows


def scaled(shape: tuple[int, ...], amax: float, seed: int = 0) -> torch.Tensor:
    """A standard normal sample of ``shape``, rescaled so that its largest magnitude is ``amax`` (fp64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x / x.abs().max() * amax


def rel(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if got is None or ref is None:
        return float("nan")
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def run(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, autocast: bool) -> dict:
    """One forward/backward; ``dy`` is given the output's dtype as the next layer's backward would."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        y = module(x)
    y.backward(dy.to(y.dtype))
    grads = [p.grad for p in module.parameters()]
    return {"y": y.detach(), "dx": x.grad, "dp": grads, "dtype": y.dtype}


def compare(got: dict, ref: dict) -> dict:
    flags = []
    if not torch.isfinite(got["y"]).all():
        flags.append("out")
    if got["dx"] is not None and not torch.isfinite(got["dx"]).all():
        flags.append("dx")
    if any(g is not None and not torch.isfinite(g).all() for g in got["dp"]):
        flags.append("dp")
    dp = max((rel(g, r) for g, r in zip(got["dp"], ref["dp"])), default=float("nan"))
    return {
        "nonfinite": "+".join(flags) or "-",
        "out": rel(got["y"], ref["y"]),
        "dx": rel(got["dx"], ref["dx"]),
        "dp": dp,
        "dtype": str(got["dtype"]).replace("torch.", ""),
    }


def island(module: nn.Module) -> nn.Module:
    """``module`` as the package makes it by default: an fp32 island (autocast off, inputs cast to fp32)."""
    wrapper = nn.Sequential(module)
    apply_fp32(wrapper, ["0"], "cpu")
    return wrapper


def sweep() -> list[dict]:
    rows = []
    for name, (make, shape) in CASES.items():
        torch.manual_seed(0)
        base = make()
        # a non-trivial affine transform, so that parameter gradients and the gain matter
        with torch.no_grad():
            for pname, p in base.named_parameters():
                p.copy_((1.0 if pname == "weight" else 0.0) + 0.1 * torch.randn_like(p))
        dy = scaled(shape, 1.0, seed=1).half()  # the upstream gradient, fp16 values for every variant
        for amax in MAGNITUDES:
            x = scaled(shape, amax)
            x16, x32 = x.half(), x.float()
            row = {"module": name, "amax": amax}
            variants = {
                "fp16": (copy.deepcopy(base), x16, True),
                "island": (island(copy.deepcopy(base)), x16, True),
                "fp32": (copy.deepcopy(base), x32, True),
            }
            refs: dict[torch.dtype, dict] = {}
            for label, (module, inp, ac) in variants.items():
                if inp.dtype not in refs:
                    refs[inp.dtype] = run(copy.deepcopy(base).double(), inp.double(), dy.double(), autocast=False)
                row[label] = compare(run(module, inp, dy, ac), refs[inp.dtype])
            rows.append(row)
    return rows


def fmt(value: float) -> str:
    if value != value:
        return "     -"
    if value == float("inf"):
        return "   inf"
    return f"{value:6.0e}"


def print_sweep(rows: list[dict]) -> None:
    head = "nonfin   out     dx     dp  dtype  "
    print(f"{'module':19} {'|x|max':>6} | fp16 in, no island: {head}| fp16 in, island: {head}| fp32 in: {head}")
    last = None
    for row in rows:
        if last is not None and row["module"] != last:
            print()
        last = row["module"]
        cells = []
        for label in ("fp16", "island", "fp32"):
            c = row[label]
            cells.append(f"{c['nonfinite']:>6} {fmt(c['out'])} {fmt(c['dx'])} {fmt(c['dp'])}  {c['dtype']:7}")
        print(f"{row['module']:19} {row['amax']:6.0e} |{' ' * 20}{cells[0]}|{' ' * 17}{cells[1]}|{' ' * 9}{cells[2]}")


def param_grads_vs_upstream() -> list[dict]:
    """Parameter gradients of an fp16-input norm against the upstream gradient's size (same-sign, as a loss
    scale x a bias gradient that agrees across rows): error and non-finite flag, fp16 input vs island."""
    rows = []
    cases = {k: CASES[k] for k in ("LayerNorm(512)", "GroupNorm(8,64)", "BatchNorm2d(64)", "RMSNorm(512)")}
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        base = make()
        x16 = scaled(shape, 4.0).half()
        g = torch.Generator().manual_seed(2)
        positive = torch.rand(shape, generator=g, dtype=torch.float64)
        for amax in (1.0, 64.0, 256.0, 1024.0):
            dy = (positive * amax).half()
            ref = run(copy.deepcopy(base).double(), x16.double(), dy.double(), autocast=False)
            row = {"module": name, "dy": amax, "true_dp": max(r.abs().max().item() for r in ref["dp"])}
            row["fp16"] = compare(run(copy.deepcopy(base), x16, dy, True), ref)
            row["island"] = compare(run(island(copy.deepcopy(base)), x16, dy, True), ref)
            rows.append(row)
    return rows


VOCABS = (32000, 50257, 65504, 65536, 128256, 152064, 256000)


def log_softmax_vocab() -> list[dict]:
    """LogSoftmax(-1) over a language model's vocabulary, on fp16 logits (an fp16 head's output) of 8 rows:
    near-equal logits (std 0.02, a head at initialization) and spread ones (std 1). Error: the largest absolute
    error of a log-probability (nats) against fp64 on the same fp16 logits."""
    rows = []
    module = nn.LogSoftmax(-1)
    isl = island(nn.LogSoftmax(-1))
    for vocab in VOCABS:
        for std in (0.02, 1.0):
            g = torch.Generator().manual_seed(4)
            logits = (torch.randn(8, vocab, generator=g) * std).half()
            ref = F.log_softmax(logits.double(), -1)
            row = {"vocab": vocab, "std": std}
            with torch.autocast("cpu", dtype=torch.float16):
                for label, m in (("fp16", module), ("island", isl)):
                    out = m(logits)
                    finite = bool(torch.isfinite(out).all())
                    err = (out.double() - ref).abs().max().item() if finite else float("inf")
                    row[label] = (finite, err)
            rows.append(row)
    return rows


def what_overflows() -> list[tuple[str, str]]:
    """Operations that do overflow in fp16 on CPU, at the smallest magnitude of the sweep where they do."""

    def first_bad(fn: Callable[[float], torch.Tensor]) -> str:
        for amax in MAGNITUDES + (7e4,):
            with torch.autocast("cpu", dtype=torch.float16):
                y = fn(amax)
            if not torch.isfinite(y).all():
                return f"non-finite from |x| = {amax:g} ({str(y.dtype).replace('torch.', '')})"
        return "finite up to |x| = 7e4"

    shape, scores, logits = (8, 64, 512), (8, 4, 64, 64), (64, 32000)
    probes: dict[str, Callable[[float], torch.Tensor]] = {
        "x.half() (the fp16 input itself)": lambda a: scaled(shape, a).half(),
        "Linear(512,512) on an fp32 x": lambda a: lin(scaled(shape, a).float()),
        "x16.pow(2).mean(-1) (hand-written variance)": lambda a: scaled(shape, a).half().pow(2).mean(-1),
        "(x16 * x16).mean(-1)": lambda a: (scaled(shape, a).half() * scaled(shape, a).half()).mean(-1),
        "x32.pow(2).mean(-1) (an fp32 residual stream)": lambda a: scaled(shape, a).float().pow(2).mean(-1),
        "x16.exp() / sum (softmax without the max shift)": lambda a: naive_softmax(scaled(scores, a).half()),
        "F.softmax(x16, -1) (the kernel shifts by the max)": lambda a: F.softmax(scaled(scores, a).half(), -1),
        "F.log_softmax(x16, -1)": lambda a: F.log_softmax(scaled(logits, a).half(), -1),
        "F.log_softmax(x32, -1)": lambda a: F.log_softmax(scaled(logits, a).float(), -1),
    }
    out = [(label, first_bad(fn)) for label, fn in probes.items()]
    for gain in (1e4, 2e4):
        ln = nn.LayerNorm(512)
        with torch.no_grad():
            ln.weight.fill_(gain)
        x16 = scaled(shape, 1.0).half()
        with torch.autocast("cpu", dtype=torch.float16):
            y = ln(x16)
            y_island = island(ln)(x16)
            next_linear = lin(y_island)
            residual = y_island + x16
        state = lambda t: "finite" if t.isfinite().all() else "inf"  # noqa: E731
        out.append(
            (
                f"LayerNorm(512), weight = {gain:g}",
                f"fp16 in: max|y| {y.float().abs().max().item():.3g}; island: fp32 "
                f"{y_island.abs().max().item():.3g}, then Linear {state(next_linear)}, residual add {state(residual)}",
            )
        )
    return out


_LIN = nn.Linear(512, 512)


def lin(x: torch.Tensor) -> torch.Tensor:
    return _LIN(x)


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    e = x.exp()
    return e / e.sum(-1, keepdim=True)


def timed(fn: Callable[[], None], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def island_cost(rounds: int) -> list[tuple[str, float, float]]:
    """(module, fp16-input fwd+bwd ms, island fwd+bwd ms incl. the next layer's cast back to fp16)."""
    rows = []
    for name, (make, shape) in CASES.items():
        if name == "SDPA":
            continue
        plain, isl = make(), island(make())
        x16 = scaled(shape, 4.0).half()
        dy = scaled(shape, 1.0, seed=1).half()

        def step(module: nn.Module, cast_back: bool, x16=x16, dy=dy) -> Callable[[], None]:
            def fn() -> None:
                x = x16.detach().requires_grad_()
                with torch.autocast("cpu", dtype=torch.float16):
                    y = module(x)
                    if cast_back:
                        y = y.half()  # what the next fp16 layer does with the island's fp32 output
                y.backward(dy)

            return fn

        rows.append((name, timed(step(plain, False), rounds) * 1e3, timed(step(isl, True), rounds) * 1e3))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds per variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    started = time.perf_counter()

    print(f"torch {torch.__version__}, 1 thread; fp16 max {FP16_MAX:g}\n")
    print("Autocast kernels registered in this build (none: the op runs in its inputs' dtype)")
    print(f"  {'op':30} {'AutocastCPU':>11} {'AutocastCUDA':>12}")
    registrations = autocast_registrations()
    for op, cpu, cuda in registrations:
        print(f"  {op:30} {'yes' if cpu else '-':>11} {'yes' if cuda else '-':>12}")

    print("\nForward + backward under CPU fp16 autocast; errors vs fp64 on the same values (max|d| / max|ref|);")
    print("nonfin: which of out / dx / dp (parameter grads) has inf or NaN; upstream gradient: N(0,1) in fp16")
    rows = sweep()
    print_sweep(rows)

    print("\nParameter gradients vs the upstream gradient's size (fp16 input |x| <= 4, same-sign dy, 1 thread)")
    print(f"  {'module':17} {'max dy':>6} {'max |dp|':>9} | fp16 in: nonfin dp err | island: nonfin dp err")
    grad_rows = param_grads_vs_upstream()
    for r in grad_rows:
        fp16, isl = r["fp16"], r["island"]
        print(
            f"  {r['module']:17} {r['dy']:6g} {r['true_dp']:9.3g} | {fp16['nonfinite']:>15} {fmt(fp16['dp'])} |"
            f" {isl['nonfinite']:>14} {fmt(isl['dp'])}"
        )

    print("\nLogSoftmax(-1) over a vocabulary, fp16 logits (8 rows); log-probability error in nats vs fp64")
    print(f"  {'vocab':>7} {'logit std':>9} | {'fp16 in: finite':>15} {'err':>7} | {'island: finite':>14} {'err':>7}")
    vocab_rows = log_softmax_vocab()
    for r in vocab_rows:
        (f16, e16), (fis, eis) = r["fp16"], r["island"]
        print(f"  {r['vocab']:7d} {r['std']:9g} | {str(f16):>15} {fmt(e16)} | {str(fis):>14} {fmt(eis)}")

    print("\nWhat does overflow in fp16 on this CPU (under CPU fp16 autocast)")
    overflows = what_overflows()
    for what, result in overflows:
        print(f"  {what:50} {result}")

    print(f"\nCost of the island on this CPU: forward + backward, median of {args.rounds}, ms")
    print(f"  {'module':19} {'fp16 in':>8} {'island':>8} {'ratio':>6}")
    costs = island_cost(args.rounds)
    for name, plain, isl in costs:
        print(f"  {name:19} {plain:8.2f} {isl:8.2f} {isl / plain:6.2f}")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return {
        "registrations": registrations,
        "sweep": rows,
        "param_grads": grad_rows,
        "log_softmax_vocab": vocab_rows,
        "overflows": overflows,
        "cost": costs,
    }


if __name__ == "__main__":
    main()
