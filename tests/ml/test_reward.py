"""The reward model with tiny models on CPU: the InstructGPT ranking loss, and learning a visible preference."""

import math

import pytest
import torch

from ml.reward import RewardConfig, ranking_loss, ranking_pairs, train_reward
from tests.support.reward import synthetic_rankings


def test_ranking_loss_equals_the_hand_computed_value():
    scores = torch.tensor([2.0, 0.5, -1.0])
    ranks = [1, 2, 3]  # candidate 0 best
    expected = (
        -(
            math.log(1 / (1 + math.exp(-(2.0 - 0.5))))
            + math.log(1 / (1 + math.exp(-(2.0 + 1.0))))
            + math.log(1 / (1 + math.exp(-(0.5 + 1.0))))
        )
        / 3
    )
    assert ranking_loss(scores, ranks).item() == pytest.approx(expected, rel=1e-6)


def test_ties_are_skipped():
    scores = torch.tensor([2.0, 0.5, -1.0])
    # candidates 1 and 2 tied: only the pairs (0, 1) and (0, 2) count.
    expected = -(math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(-3.0)))) / 2
    assert ranking_pairs([1, 2, 2]) == ([0, 0], [1, 2])
    assert ranking_loss(scores, [1, 2, 2]).item() == pytest.approx(expected, rel=1e-6)
    assert ranking_loss(scores, [1, 1, 1]) is None


def test_the_loss_is_one_element_per_ranking_not_per_pair():
    """K candidates give C(K,2) pairs, averaged into one value: scaling K does not scale the loss."""
    scores = torch.linspace(3, -3, 9)
    assert len(ranking_pairs(list(range(1, 10)))[0]) == 36
    assert 0 < ranking_loss(scores, list(range(1, 10))).item() < 1


def test_the_reward_model_learns_a_visible_preference(tiny_model_dirs, tmp_path):
    config = RewardConfig(epochs=6, learning_rate=2e-3, rankings_per_batch=8, max_length=64, seed=0)
    demonstrations = [([{"role": "user", "content": "Hi"}], "river banana garden")] * 4
    result = train_reward(
        config,
        synthetic_rankings(160, seed=1),
        synthetic_rankings(30, seed=2),
        base_dir=tiny_model_dirs[0],
        output_dir=tmp_path / "rm",
        holdout=synthetic_rankings(20, seed=3),
        demonstrations=demonstrations,
    )
    assert result.metrics["val_accuracy"] >= 0.9, result.metrics
    assert result.metrics["holdout_accuracy"] >= 0.9, result.metrics
    assert "rm/train_loss" in result.series and "rm/val_accuracy" in result.series

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ml.scoring import score_pairs

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    scores = score_pairs(model, tokenizer, demonstrations)
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4), "demonstrations average 0 after the shift"
    assert not list((tmp_path / "rm").glob("*.bin"))


def test_the_reward_model_trains_with_lora(tiny_model_dirs, tmp_path):
    config = RewardConfig(epochs=6, learning_rate=1e-2, rankings_per_batch=8, max_length=64, lora=True, lora_rank=8)
    result = train_reward(
        config,
        synthetic_rankings(64, seed=4),
        synthetic_rankings(16, seed=5),
        base_dir=tiny_model_dirs[0],
        output_dir=tmp_path / "rm",
    )
    losses = [value for _, value in result.series["rm/train_loss"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, "the adapters learn"
    assert result.metrics["val_accuracy"] >= 0.9, result.metrics
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files


def test_kept_frozen_block_states_give_the_full_models_scores(tiny_model_dirs):
    from ml.modeling import train_top_layers_only
    from ml.reward import RewardBlocks, load_reward_model

    model, tokenizer = load_reward_model(tiny_model_dirs[0], dtype=torch.float32, device=torch.device("cpu"))
    train_top_layers_only(model, 1)
    pairs = [(r.context, c) for r in synthetic_rankings(3, seed=6) for c in r.candidates]
    frozen = RewardBlocks(model, tokenizer, trained_blocks=1, max_length=64)
    assert frozen.below == model.config.num_hidden_layers - 1
    assert frozen.matches_full_model(pairs, tolerance=1e-5)
    assert model.config.num_hidden_layers == len(model.model.layers), "the backbone is whole again afterwards"
    scores = frozen.scores(pairs[:2])
    scores.sum().backward()
    lowest_trained = model.model.layers[-1].self_attn.q_proj.weight
    assert lowest_trained.grad is not None and lowest_trained.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None


def test_top_layer_training_on_kept_states_trains_like_the_full_pass(tiny_model_dirs, tmp_path):
    config = RewardConfig(
        epochs=6, learning_rate=2e-3, rankings_per_batch=8, max_length=64, seed=0, train_top_layers=1,
        head_learning_rate=5e-3,
    )  # fmt: skip
    cached = train_reward(
        config, synthetic_rankings(160, seed=1), synthetic_rankings(30, seed=2),
        base_dir=tiny_model_dirs[0], output_dir=tmp_path / "cached",
    )  # fmt: skip
    full = train_reward(
        RewardConfig(**{**config.__dict__, "cache_frozen_blocks": False}), synthetic_rankings(160, seed=1),
        synthetic_rankings(30, seed=2), base_dir=tiny_model_dirs[0], output_dir=tmp_path / "full",
    )  # fmt: skip
    losses_cached = [v for _, v in cached.series["rm/train_loss"]]
    losses_full = [v for _, v in full.series["rm/train_loss"]]
    assert losses_cached == pytest.approx(losses_full, abs=2e-3), "the same losses step by step"
    assert losses_cached[-1] < losses_cached[0]
    assert cached.metrics["val_accuracy"] == pytest.approx(full.metrics["val_accuracy"], abs=0.05)


def test_the_frozen_block_pass_reports_progress_and_stops_when_cancelled(tiny_model_dirs, tmp_path):
    """The pass over every reply takes minutes with the default model: it must keep the run's heartbeat (a run
    silent for TRAINING_HEARTBEAT_TIMEOUT_S is reaped as lost) and honour a cancel."""
    from ml.runs import Cancelled, Progress

    flushes = []
    progress = Progress(sink=lambda p: flushes.append(p.step), should_stop=lambda: len(flushes) > 3, interval_s=0)
    config = RewardConfig(epochs=1, max_length=64, train_top_layers=1)
    rankings = synthetic_rankings(40, seed=1)
    with pytest.raises(Cancelled):
        train_reward(config, rankings, [], base_dir=tiny_model_dirs[0], output_dir=tmp_path / "rm", progress=progress)
    assert len(flushes) == 4 and flushes[-1] == 0, "stopped during the frozen pass, before the first step"
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize(("series", "kept"), [([0.9, 0.6, 0.7], 1), ([0.5, 0.8, 0.8], 2), ([0.5, 0.6, 0.7], 3)])
def test_the_epoch_with_the_best_validation_accuracy_is_kept(tiny_model_dirs, tmp_path, monkeypatch, series, kept):
    """Training and scoring are real; the validation accuracy each epoch reports is scripted (where the real one
    would be whatever the tiny model learns), so that which epoch is best is known. The saved weights must be those
    the model had when that epoch's validation ran, and the metrics say so."""
    import ml.reward

    real, states, scripted = ml.reward.pairwise_accuracy, [], iter(series)

    def scripted_accuracy(model, tokenizer, rankings, **kwargs):
        states.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return {**real(model, tokenizer, rankings, **kwargs), "accuracy": next(scripted)}

    monkeypatch.setattr(ml.reward, "pairwise_accuracy", scripted_accuracy)
    config = RewardConfig(epochs=3, learning_rate=2e-3, rankings_per_batch=8, max_length=64, train_top_layers=1)
    result = train_reward(
        config,
        synthetic_rankings(32, seed=1),
        synthetic_rankings(8, seed=2),
        base_dir=tiny_model_dirs[0],
        output_dir=tmp_path / "rm",
    )
    assert (result.metrics["kept_epoch"], result.metrics["val_accuracy"]) == (kept, max(series))
    assert result.metrics["val_accuracy_last_epoch"] == series[-1]
    assert len(states) == 3 and all(not torch.equal(states[0][n], states[-1][n]) for n in states[0]), "all learn"

    from transformers import AutoModelForSequenceClassification

    saved = dict(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").named_parameters())
    for name, value in states[kept - 1].items():
        assert torch.allclose(saved[name], value), name
