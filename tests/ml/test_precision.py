"""Mixed precision on the CPU: bf16 autocast where asked for (TRAINING_CPU_BF16), fp32 weights, still learning."""

import pytest
import torch

from ml import device
from ml.dpo import DPOConfig, train_dpo
from ml.reward import RewardConfig, train_reward
from tests.support.dpo import synthetic_rankings as dpo_rankings
from tests.support.reward import synthetic_rankings


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("FALSE", False), ("on", True)])
def test_the_setting_switches_bf16_autocast(monkeypatch, value, expected):
    monkeypatch.setenv("TRAINING_CPU_BF16", value)
    assert device.cpu_bf16() is expected
    with device.autocast():
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == (torch.bfloat16 if expected else torch.float32)


@pytest.mark.parametrize("value", ["maybe", "bf16", "2"])
def test_a_bad_value_is_refused_with_its_name(monkeypatch, value):
    from django.core.exceptions import ImproperlyConfigured

    from config.env import env_bool_or_auto

    monkeypatch.setenv("TRAINING_CPU_BF16", value)
    with pytest.raises(ValueError, match="TRAINING_CPU_BF16"):  # ml/ imports no Django, so not ImproperlyConfigured
        device.cpu_bf16()
    with pytest.raises(ImproperlyConfigured, match="TRAINING_CPU_BF16"):
        env_bool_or_auto("TRAINING_CPU_BF16", "auto")  # the settings' start-up check


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_auto_follows_the_processors_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setenv("TRAINING_CPU_BF16", "auto")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert device.cpu_bf16() is expected


def test_the_reward_model_and_dpo_learn_under_bf16_autocast_with_fp32_weights(monkeypatch, tiny_model_dirs, tmp_path):
    monkeypatch.setenv("TRAINING_CPU_BF16", "true")
    config = RewardConfig(
        epochs=6, learning_rate=2e-3, rankings_per_batch=8, max_length=64, train_top_layers=1, head_learning_rate=5e-3
    )
    result = train_reward(
        config, synthetic_rankings(160, seed=1), synthetic_rankings(30, seed=2),
        base_dir=tiny_model_dirs[0], output_dir=tmp_path / "rm",
    )  # fmt: skip
    losses = [v for _, v in result.series["rm/train_loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    dpo = train_dpo(
        DPOConfig(epochs=3, rankings_per_batch=4, max_length=64, beta=0.5, train_top_layers=1, learning_rate=3e-3),
        dpo_rankings(40, seed=1), dpo_rankings(20, seed=2), policy_dir=tiny_model_dirs[0], output_dir=tmp_path / "dpo",
    )  # fmt: skip
    assert dpo.metrics["val_accuracy"] >= 0.9, dpo.metrics
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dpo" / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}, "fp32"  # noqa: SIM118
