"""Tiny models and trainers shared by the tests: small enough that fp16 on CPU stays fast."""

from __future__ import annotations

import inspect

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler
from lightning_mp.options import GRADSCALER_RULE

DEVICE = "cpu"


def gradscaler_reproduction(**knobs) -> AdaptiveLossScaler:
    """An ``AdaptiveLossScaler`` on torch.amp.GradScaler's own rule (the same scale trajectory, step for step):
    the one place the tests write those settings."""
    return AdaptiveLossScaler(DEVICE, **GRADSCALER_RULE, **knobs)


def loader(samples: int = 12, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyRegressor(L.LightningModule):
    """A two-layer MLP that records what autocast looked like in each kind of step.

    Args:
        poison_steps: global steps whose loss is multiplied by ``poison`` (NaN by default), which makes
            every gradient of that step non-finite.
        optimizer: "sgd", "adam", "fused_adam" or "lbfgs".
        scheduler: "step" adds a StepLR(step_size=1, gamma=0.5) stepped every optimizer step.
    """

    def __init__(self, lr=0.1, poison_steps=(), poison=float("nan"), optimizer="sgd", scheduler=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr, self.poison_steps, self.poison = lr, set(poison_steps), poison
        self.optimizer_name, self.scheduler_name = optimizer, scheduler
        self.seen: dict[str, tuple[bool, torch.dtype]] = {}

    def _record(self, kind: str, out: torch.Tensor) -> None:
        self.seen[kind] = (torch.is_autocast_enabled(DEVICE), out.dtype)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self._record("train", out)
        loss = F.mse_loss(out.float(), y)
        if self.global_step in self.poison_steps:
            loss = loss * self.poison
        return loss

    def validation_step(self, batch, batch_idx):
        self._record("validate", self(batch[0]))

    def test_step(self, batch, batch_idx):
        self._record("test", self(batch[0]))

    def predict_step(self, batch, batch_idx):
        out = self(batch[0])
        self._record("predict", out)
        return out

    def configure_optimizers(self):
        params = self.parameters()
        optimizer = {
            "sgd": lambda: torch.optim.SGD(params, lr=self.lr, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=self.lr),
            "fused_adam": lambda: torch.optim.Adam(params, lr=self.lr, fused=True),
            "lbfgs": lambda: torch.optim.LBFGS(params, lr=self.lr),
        }[self.optimizer_name]()
        if self.scheduler_name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer


class ManualRegressor(TinyRegressor):
    """The same model trained with manual optimization."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


def trainer(plugins=None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(plugins=plugins, **defaults)


def fit(plugin=None, model=None, model_cls=TinyRegressor, seed=0, data=None, ckpt_path=None, **trainer_kwargs):
    """Seeded fit of a fresh ``model_cls()`` (or of ``model``, seeded by the caller); returns (model, trainer)."""
    torch.manual_seed(seed)
    model = model if model is not None else model_cls()
    t = trainer(plugins=[plugin] if plugin is not None else None, **trainer_kwargs)
    t.fit(model, data if data is not None else loader(), ckpt_path=ckpt_path)
    return model, t


def line_of(function, text: str) -> int:
    """The line number of the first line of ``function`` containing ``text`` (what a source line must name)."""
    lines, start = inspect.getsourcelines(function)
    return start + next(i for i, line in enumerate(lines) if text in line)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


class NaiveLogSumExp(nn.Module):
    """log(sum(exp(k * x))): finite in fp32, but exp overflows fp16 once k * x > 11 (a classic fp16 bug)."""

    def __init__(self, k: float = 8.0):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.log(torch.exp(self.k * x).sum(dim=-1, keepdim=True))


class Explode(torch.autograd.Function):
    """Identity in the forward; multiplies the gradient by ``factor`` in the backward (a backward overflow)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class ExplodingBackward(nn.Module):
    """Identity times a learnable gain in the forward; multiplies its gradient by ``factor`` in the backward."""

    def __init__(self, factor: float = 1e4):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.factor = factor

    def forward(self, x):
        return Explode.apply(x * self.gain, self.factor)


class TroubleNet(TinyRegressor):
    """inp -> middle -> head, where ``middle`` is the module under test."""

    def __init__(self, middle: nn.Module, width: int = 8, **kwargs):
        super().__init__(**kwargs)
        head_in = 1 if isinstance(middle, NaiveLogSumExp) else width
        self.net = nn.Sequential()
        self.inp = nn.Linear(4, width)
        self.middle = middle
        self.head = nn.Linear(head_in, 1)

    def forward(self, x):
        return self.head(self.middle(self.inp(x)))


class LSTMRegressor(TinyRegressor):
    """An LSTM over a length-5 sequence: its CPU fp16 kernel does not exist (oneDNN raises)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.lstm(x.unsqueeze(1).expand(-1, 5, -1))
        return self.head(out[:, -1])


def loader_with(x: torch.Tensor, y: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def scaled_loader(scale: float, samples: int = 12) -> DataLoader:
    """The default data with inputs multiplied by ``scale`` (large inputs trigger forward overflows)."""
    x, y = loader(samples).dataset.tensors
    return loader_with(x * scale, y)


class Chain(nn.Module):
    """Three linear layers in a row: a -> b -> c."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Spiky(nn.Module):
    """A block with one ``Linear`` and an overflowing multiply in its own ``forward``: ``h * gain / gain`` is ``h``
    in fp32, but its first product overflows fp16 once ``|h| > 65504 / gain``."""

    def __init__(self, width: int = 32, gain: float = 1e4):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.gain = gain

    def forward(self, x):
        h = self.proj(x)
        return h * self.gain / self.gain  # the overflowing line


class SpikyRegressor(TinyRegressor):
    """``Sequential(Linear(4, 32), ReLU(), Spiky(), ReLU(), Linear(32, 1))``: the block holds 63% of the
    parameters, and its own arithmetic (not its Linear) overflows fp16 on large inputs."""

    def __init__(self, gain: float = 1e4, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), Spiky(32, gain), nn.ReLU(), nn.Linear(32, 1))


class OpRecorder:
    """Records ``(innermost module, aten operation, output dtype)`` for every floating operation a forward runs:
    what precision each module's own code really computed in. Module names come from global forward hooks (a
    public torch API), the operations from a dispatch mode."""

    def __init__(self, model: nn.Module):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.names = {id(m): fqn for fqn, m in model.named_modules()}
        self.stack: list[str] = []
        self.ops: list[tuple[str, str, torch.dtype]] = []
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    recorder.ops.append((recorder.stack[-1] if recorder.stack else "", func.name(), out.dtype))
                return out

        self.mode = Mode()

    def _push(self, module, args):
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)

    def _pop(self, module, args, output):
        if id(module) in self.names:
            self.stack.pop()

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.handles = [register_module_forward_pre_hook(self._push), register_module_forward_hook(self._pop)]
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def fp32_modules(self, ignore=("aten::_to_copy", "aten::clone", "aten::detach")) -> set[str]:
        """The modules whose own operations produced fp32 values (casts and copies not counted)."""
        return {module for module, op, dtype in self.ops if dtype == torch.float32 and op not in ignore}

    def dtypes(self, op_prefix: str) -> dict[str, set[torch.dtype]]:
        """Per module, the output dtypes of the operations whose name starts with ``op_prefix``."""
        found: dict[str, set[torch.dtype]] = {}
        for module, op, dtype in self.ops:
            if op.startswith(op_prefix):
                found.setdefault(module, set()).add(dtype)
        return found
