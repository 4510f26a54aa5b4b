"""Which formats this device only emulates (what the comparison's speed column marks)."""

from __future__ import annotations

import pytest

from lightning_mp.formats import auto, emulated


@pytest.mark.parametrize(("bf16", "fp16"), [(True, True), (False, True), (True, False), (False, False)])
def test_a_format_is_emulated_on_a_cpu_without_its_instructions(monkeypatch, bf16, fp16):
    flags = {"avx512_bf16": bf16, "amx_bf16": False, "avx512_fp16": fp16, "amx_fp16": False}
    monkeypatch.setattr(auto, "cpu_capability", lambda: flags)
    monkeypatch.setattr(auto.platform, "machine", lambda: "x86_64")
    assert emulated("bf16-mixed", "cpu") is not bf16
    assert emulated("16-mixed", "cpu") is not fp16
    assert emulated("32-true", "cpu") is False
    assert emulated("bf16-mixed", "cuda") is False and emulated("16-mixed", "cuda") is False
