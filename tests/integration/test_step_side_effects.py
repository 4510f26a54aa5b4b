"""A replay and a rescue run the user's training_step again; what that code changes must end as one run leaves it.

The shapes are the ones users write: Lightning's own GAN example (manual optimization, ``toggle_optimizer`` /
``untoggle_optimizer``, the ``toggled_optimizer`` context manager, a third optimizer, an early ``return`` that
skips the untoggle, a tensor kept on the module, a discriminator put in ``eval()`` for the generator's turn, a
hook registered for the step) and a BYOL / MoCo / DINO style EMA teacher updated inside ``training_step``
(in place, through ``.data``, or by rebinding ``.data``). Each run is compared with a reference: the same run
with ``replay=False``, or, for a rescue, a run that used the lower scale from the start.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from tests.helpers import gradscaler_reproduction, trainer

LATENT, IMAGE = 4, 8


def _images(batches: int = 4, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(batches * batch_size, IMAGE, generator=gen)), batch_size=batch_size)


class GAN(L.LightningModule):
    """Lightning's GAN example (domain_templates/generative_adversarial_net.py), shrunk.

    Args:
        shape: ``"toggle"`` (toggle / untoggle calls), ``"context"`` (``with self.toggled_optimizer(opt)``),
            ``"three"`` (a third optimizer for an encoder trained after the discriminator) or ``"early_return"``
            (the discriminator's untoggle is skipped by a ``return`` on odd batches; the step starts by setting
            every flag itself, as pix2pix's ``set_requires_grad`` does, so the skipped untoggle does no harm).
        nan_batches: batch indices whose discriminator loss is NaN (a bad step in any precision).
    """

    def __init__(self, shape: str = "toggle", nan_batches=()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.shape, self.nan_batches = shape, set(nan_batches)
        self.generator = nn.Sequential(nn.Linear(LATENT, 16), nn.LeakyReLU(0.2), nn.Linear(16, IMAGE), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(IMAGE, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.encoder = nn.Linear(IMAGE, LATENT) if shape == "three" else None
        self.steps_seen = 0  # a plain counter on the module
        self.hook_calls = 0

    def forward(self, z):
        return self.generator(z)

    def _count_hook(self, module, args, output):
        self.hook_calls += 1

    def _discriminator_turn(self, imgs, z, opt_d, batch_idx):
        valid = torch.ones(imgs.size(0), 1, device=imgs.device)
        real = F.binary_cross_entropy_with_logits(self.discriminator(imgs).float(), valid)
        fake = F.binary_cross_entropy_with_logits(
            self.discriminator(self.generated_imgs.detach()).float(), torch.zeros_like(valid)
        )
        d_loss = (real + fake) / 2
        if batch_idx in self.nan_batches:
            d_loss = d_loss * float("nan")
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()

    def training_step(self, batch, batch_idx):
        (imgs,) = batch
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers[0], optimizers[1]
        self.steps_seen += 1
        if self.shape == "early_return":
            self.generator.requires_grad_(True)
            self.discriminator.requires_grad_(True)
        z = torch.randn(imgs.shape[0], LATENT, device=imgs.device)
        valid = torch.ones(imgs.size(0), 1, device=imgs.device)

        # The generator's turn, with the discriminator in eval mode and a hook counting its calls.
        self.toggle_optimizer(opt_g)
        self.discriminator.eval()
        handle = self.discriminator.register_forward_hook(self._count_hook)
        self.generated_imgs = self(z)  # kept on the module, as the example does
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generated_imgs).float(), valid)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        handle.remove()
        self.discriminator.train()
        self.untoggle_optimizer(opt_g)

        # The discriminator's turn: the step the replay runs again.
        if self.shape == "context":
            with self.toggled_optimizer(opt_d):
                self._discriminator_turn(imgs, z, opt_d, batch_idx)
        else:
            self.toggle_optimizer(opt_d)
            self._discriminator_turn(imgs, z, opt_d, batch_idx)
            if self.shape == "early_return" and batch_idx % 2:
                return  # the untoggle is skipped: D's toggled flags stay until the next toggle
            self.untoggle_optimizer(opt_d)

        if self.shape == "three":
            opt_e = optimizers[2]
            with self.toggled_optimizer(opt_e):
                e_loss = F.mse_loss(self.encoder(self.generated_imgs.detach()).float(), z)
                self.manual_backward(e_loss)
                opt_e.step()
                opt_e.zero_grad()

    def configure_optimizers(self):
        optimizers = [
            torch.optim.Adam(self.generator.parameters(), lr=2e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-3),
        ]
        if self.encoder is not None:
            optimizers.append(torch.optim.Adam(self.encoder.parameters(), lr=2e-3))
        return optimizers


def _plugin(precision: str, replay: bool) -> AdaptiveMP:
    if precision == "16-mixed":
        # Far too high a first scale: the first steps overflow in the backward and are replayed, as the first
        # discriminator step of a real GAN does at the default 2^16 when its loss is large.
        scaler = {"init_scale": 2.0**40, "policy": "dynamic"}
        return AdaptiveMP(precision, scaler=scaler, replay=replay, attach_callbacks=False)
    return AdaptiveMP(precision, replay=replay, attach_callbacks=False)


def _fit_gan(shape: str, precision: str, replay: bool) -> tuple[GAN, AdaptiveMP]:
    torch.manual_seed(0)
    model = GAN(shape, nan_batches=(1,) if precision == "bf16-mixed" else ())
    plugin = _plugin(precision, replay)
    trainer(plugin, max_epochs=1, max_steps=-1).fit(model, _images())
    return model, plugin


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": [len(m._forward_hooks) for m in model.modules()],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]
    for name, tensor in a["tensors"].items():
        assert torch.equal(tensor, b["tensors"][name]), name


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", ["toggle", "context", "three", "early_return"])
def test_a_replayed_gan_step_ends_as_the_same_run_without_replay(shape, precision):
    replayed, plugin = _fit_gan(shape, precision, replay=True)
    assert any(event.reproduced for event in plugin.overflow_events), "the bad step was replayed"
    plain, plain_plugin = _fit_gan(shape, precision, replay=False)
    assert plugin.skipped_steps == plain_plugin.skipped_steps > 0
    _assert_same(_state(replayed), _state(plain))
    assert replayed.steps_seen == plain.steps_seen == 4
    assert replayed.hook_calls == plain.hook_calls
    assert torch.equal(replayed.generated_imgs, plain.generated_imgs)
    assert _toggled(replayed) == _toggled(plain)  # Lightning's toggling state as the step left it


def _toggled(model: GAN) -> list[tuple[str, bool]]:
    saved = {id(p): flag for p, flag in model._param_requires_grad_state.items()}
    return [(name, saved[id(p)]) for name, p in model.named_parameters() if id(p) in saved]


class EMATeacher(L.LightningModule):
    """A student trained to match an EMA teacher updated in ``training_step`` (BYOL / MoCo / DINO style).

    Args:
        style: how the teacher is written: ``"inplace"`` (``t.mul_(m).add_(s)`` under ``no_grad``), ``"data"``
            (DINO's ``t.data.mul_(m).add_(...)``) or ``"rebind"`` (MoCo v1's ``t.data = t.data * m + ...``).
        start: the first global step that updates the teacher (a warm-up).
        nan_steps: global steps whose loss is NaN; ``explode_steps``: global steps whose backward overflows
            fp16 at the default scale (a rescue), through a gain on the student's output gradient.
    """

    def __init__(self, style="inplace", start=0, nan_steps=(), gain=1.0) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).requires_grad_(False)
        self.style, self.start, self.nan_steps, self.gain = style, start, set(nan_steps), gain
        self.updates = 0
        self.step_losses: list[torch.Tensor] = []  # Lightning 2's pattern for epoch-end metrics

    def _update_teacher(self, m: float = 0.9) -> None:
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                if self.style == "inplace":
                    t.mul_(m).add_(s.detach(), alpha=1 - m)
                elif self.style == "data":
                    t.data.mul_(m).add_((1 - m) * s.data)
                else:
                    t.data = t.data * m + s.data * (1 - m)
        self.updates += 1

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.global_step >= self.start:
            self._update_teacher()  # before the teacher's forward: a twice-updated teacher changes the loss
        loss = F.mse_loss(self.student(x).float(), self.teacher(x).float()) * self.gain
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        self.step_losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.05 / self.gain)


def _features(batches: int = 6) -> DataLoader:
    gen = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(batches * 4, 4, generator=gen)), batch_size=4)


def _fit_ema(plugin: AdaptiveMP, steps: int = 6, **model_kwargs) -> EMATeacher:
    torch.manual_seed(0)
    model = EMATeacher(**model_kwargs)
    trainer(plugin, max_steps=steps).fit(model, _features(steps))
    return model


STYLES = ["inplace", "data", "rebind"]


@pytest.mark.parametrize("style", STYLES)
def test_a_replayed_step_updates_an_ema_teacher_once(style):
    replayed_plugin = AdaptiveMP("bf16-mixed", attach_callbacks=False)
    replayed = _fit_ema(replayed_plugin, style=style, nan_steps=(2,))
    assert replayed_plugin.overflow_events[0].reproduced
    plain = _fit_ema(AdaptiveMP("bf16-mixed", replay=False, attach_callbacks=False), style=style, nan_steps=(2,))
    for name, tensor in replayed.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
    assert replayed.updates == plain.updates == 6
    assert len(replayed.step_losses) == len(plain.step_losses) == 6


def _scaler(init_scale: float) -> AdaptiveLossScaler:
    return gradscaler_reproduction(init_scale=init_scale)


@pytest.mark.parametrize("style", STYLES)
def test_a_rescued_step_updates_an_ema_teacher_once(style):
    # This model's backward overflows fp16 at 2^14 and not at 2^13: the first step is rescued at 2^13. The
    # rescued run must equal a run that used 2^13 from the start, teacher, counter and kept losses included.
    rescuing = AdaptiveMP("16-mixed", scaler=_scaler(2.0**14), rescue=True, attach_callbacks=False)
    rescued = _fit_ema(rescuing, style=style, gain=3e4)
    reference_plugin = AdaptiveMP("16-mixed", scaler=_scaler(2.0**13), rescue=True, attach_callbacks=False)
    reference = _fit_ema(reference_plugin, style=style, gain=3e4)
    assert rescuing.rescued_steps == reference_plugin.rescued_steps + 1
    for name, tensor in rescued.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert rescued.updates == reference.updates == 6
    assert len(rescued.step_losses) == 6
    assert all(torch.equal(a, b) for a, b in zip(rescued.step_losses, reference.step_losses))


class TeacherWrittenOnce(L.Callback):
    """Checks, every step, that the teacher ends the step as one EMA update of what the step began with."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = [(t.clone(), s.clone()) for t, s in zip(module.teacher.parameters(), module.student.parameters())]
        self.update = trainer.global_step >= module.start

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for (t0, s0), t in zip(self.before, module.teacher.parameters()):
            expected = t0.mul(0.9).add_(s0, alpha=0.1) if self.update else t0
            assert torch.equal(t, expected)
        self.checked += 1


def test_a_teacher_that_starts_updating_late_is_still_written_once_by_a_rescued_step():
    # The first step's watch saw no write (the warm-up): the first rescue after the EMA starts learns it from
    # the re-run, puts the teacher back as one update leaves it and says so; later rescues copy it up front.
    # growth_interval=1: the scale grows back to 2^14 after every clean step, so every step is rescued.
    scaler = AdaptiveLossScaler("cpu", init_scale=2.0**14, growth_interval=1, policy="dynamic", hysteresis=1)
    plugin = AdaptiveMP("16-mixed", scaler=scaler, rescue=True, attach_callbacks=False)
    check = TeacherWrittenOnce()
    torch.manual_seed(0)
    model = EMATeacher(start=2, gain=3e4)
    with pytest.warns(UserWarning, match=r"training_step writes teacher\.0\.bias.* in place"):
        trainer(plugin, max_steps=6, callbacks=[check]).fit(model, _features())
    assert check.checked == 6
    assert plugin.rescued_steps >= 2
    assert model.updates == 4
