"""The bf16 / gradient-checkpointing defaults decided from the hardware (integrations/hardware.py), and
that DifferADGRPOConfig applies them instead of TRL's "on everywhere"."""

from __future__ import annotations

import warnings

import pytest

from differad_rl.integrations import hardware


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(hardware, "accelerator_available", lambda: False)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_rule(cpu_only, monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.resolve_bf16(None, use_cpu=True) is False  # never on by default on a CPU
    assert hardware.resolve_bf16(False, use_cpu=True) is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = hardware.resolve_bf16(True, use_cpu=True)
    assert asked is native  # honoured only where the CPU runs bf16 natively
    messages = [str(w.message) for w in caught]
    assert (not native) == any("bf16=True on a CPU without native bf16" in m and "bf16=False" in m for m in messages)


def test_gradient_checkpointing_rule(cpu_only):
    assert hardware.resolve_gradient_checkpointing(None, use_cpu=False) is False  # no accelerator: a CPU run
    assert hardware.resolve_gradient_checkpointing(True, use_cpu=True) is True
    assert hardware.resolve_gradient_checkpointing(False, use_cpu=True) is False


def test_accelerator_defaults(monkeypatch):
    monkeypatch.setattr(hardware, "accelerator_available", lambda: True)
    assert hardware.resolve_gradient_checkpointing(None, use_cpu=False) is True  # TRL's default, for memory
    assert hardware.resolve_gradient_checkpointing(None, use_cpu=True) is False  # use_cpu wins
    assert hardware.resolve_bf16(None, use_cpu=False, fp16=True) is False


@pytest.mark.parametrize("bad", ["yes", 1])
def test_bad_values_name_the_field(bad):
    with pytest.raises(ValueError, match="bf16 must be True, False or None"):
        hardware.resolve_bf16(bad, use_cpu=True)
    with pytest.raises(ValueError, match="gradient_checkpointing must be True, False or None"):
        hardware.resolve_gradient_checkpointing(bad, use_cpu=True)


def test_native_bf16_probe_is_a_bool():
    assert isinstance(hardware.cpu_has_native_bf16(), bool)


def test_config_decides_trl_defaults_from_the_hardware(tmp_path, cpu_only, monkeypatch):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    from differad_rl.integrations.trl import DifferADGRPOConfig

    trl_cfg = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert trl_cfg.bf16 is True and trl_cfg.gradient_checkpointing is True  # what we do not inherit
    cfg = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="running fp32"):
        slow_cpu = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=True)
    assert slow_cpu.bf16 is False
    explicit = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=True)
    assert explicit.gradient_checkpointing is True
    paper = DifferADGRPOConfig.paper(str(tmp_path), use_cpu=True, report_to=[], bf16=False)
    assert paper.gradient_checkpointing is True  # the GPU recipe's explicit choice, kept
