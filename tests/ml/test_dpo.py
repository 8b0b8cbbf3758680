"""DPO on tiny real models on the CPU: the ranking loss by hand (ties, label smoothing), the reply tokens counted,
log 2 at the start, learning a visible preference with full, top-layer and LoRA training, and cancellation."""

import math

import pytest
import torch
import torch.nn.functional as F

from ml.dpo import (
    DPOConfig,
    dpo_ranking_loss,
    implicit_reward_accuracy,
    sequence_logprobs,
    train_dpo,
)
from ml.reward import Ranked
from ml.runs import Cancelled, Progress
from tests.support.dpo import synthetic_rankings


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_the_loss_of_one_ranking_by_hand():
    policy = torch.tensor([-10.0, -12.0, -9.0])
    reference = torch.tensor([-11.0, -11.0, -11.0])
    # Implicit rewards with beta 0.5: 0.5, -0.5, 1.0. Ranks: candidate 0 best, then 2, then 1.
    r = [0.5, -0.5, 1.0]
    pairs = [(0, 1), (0, 2), (2, 1)]
    expected = -sum(log_sigmoid(r[w] - r[lo]) for w, lo in pairs) / 3
    assert dpo_ranking_loss(policy, reference, [1, 3, 2], beta=0.5).item() == pytest.approx(expected, rel=1e-6)

    # Candidates 1 and 2 tied: only (0, 1) and (0, 2) count; everything tied gives no loss at all.
    tied = -(log_sigmoid(r[0] - r[1]) + log_sigmoid(r[0] - r[2])) / 2
    assert dpo_ranking_loss(policy, reference, [1, 2, 2], beta=0.5).item() == pytest.approx(tied, rel=1e-6)
    assert dpo_ranking_loss(policy, reference, [2, 2, 2], beta=0.5) is None

    # cDPO: -(1 - ls) log sigma(d) - ls log sigma(-d), per pair.
    smoothed = -sum(0.9 * log_sigmoid(r[w] - r[lo]) + 0.1 * log_sigmoid(r[lo] - r[w]) for w, lo in pairs) / 3
    loss = dpo_ranking_loss(policy, reference, [1, 3, 2], beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(smoothed, rel=1e-6)


def test_r_dpo_explains_the_length_share_of_a_preference_by_its_length_term():
    policy = torch.tensor([-10.0, -12.0, -9.0])
    reference = torch.tensor([-11.0, -11.0, -11.0])
    lengths = torch.tensor([40, 10, 25])
    r, n, alpha = [0.5, -0.5, 1.0], [40, 10, 25], 0.02
    pairs = [(0, 1), (0, 2), (2, 1)]
    expected = -sum(log_sigmoid(r[w] - r[lo] + alpha * (n[w] - n[lo])) for w, lo in pairs) / 3
    loss = dpo_ranking_loss(policy, reference, [1, 3, 2], beta=0.5, lengths=lengths, length_penalty=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The longer winners already explain part of the preference: less loss, so less push on the policy to prefer
    # them (the gradient on their log-probs is smaller) than plain DPO gives.
    plain_policy, penalised_policy = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    dpo_ranking_loss(plain_policy, reference, [1, 3, 2], beta=0.5).backward()
    dpo_ranking_loss(penalised_policy, reference, [1, 3, 2], 0.5, lengths=lengths, length_penalty=alpha).backward()
    assert loss.item() < dpo_ranking_loss(policy, reference, [1, 3, 2], beta=0.5).item()
    assert 0 < -penalised_policy.grad[0] < -plain_policy.grad[0]
    with pytest.raises(ValueError, match="reply lengths"):
        dpo_ranking_loss(policy, reference, [1, 3, 2], beta=0.5, length_penalty=alpha)


def test_length_balancing_weighs_longer_winners_until_winners_are_not_longer_on_average():
    from ml.dpo import longer_winner_weight

    rankings = [Ranked([], ["a", "b", "c"], [1, 2, 3]), Ranked([], ["d", "e"], [1, 2])]
    # Pairs (winner - loser length): 10-4=+6, 10-2=+8, 4-2=+2; and 3-9=-6. Longer: 16, shorter: 6.
    lengths = [[10, 4, 2], [3, 9]]
    assert longer_winner_weight(rankings, lengths) == pytest.approx(6 / 16)
    assert longer_winner_weight(rankings, [[2, 4, 10], [3, 9]]) == 1.0, "winners shorter: nothing to take out"
    # In the loss, the pairs whose winner is longer count that weight; the mean is over all of the ranking's pairs.
    policy, reference = torch.tensor([0.0, -1.0, -3.0]), torch.tensor([0.0, 0.0, 0.0])
    sizes = torch.tensor([10, 4, 12])
    plain = [-F.logsigmoid(torch.tensor(0.1 * d)) for d in (1.0, 3.0, 2.0)]  # margins of (0,1), (0,2), (1,2)
    weighted = dpo_ranking_loss(policy, reference, [1, 2, 3], 0.1, lengths=sizes, longer_winner_weight=0.5)
    assert float(weighted) == pytest.approx(float((0.5 * plain[0] + plain[1] + plain[2]) / 3), rel=1e-5)


def test_implicit_reward_accuracy_counts_ordered_pairs_and_ties_as_half():
    policy = [torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([-5.0, -4.0]), torch.tensor([0.0, 0.0])]
    reference = [torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([-5.0, -5.0]), torch.tensor([-1.0, -1.0])]
    ranks = [[1, 2, 3], [1, 2], [1, 1]]
    # Ranking 1 rewards 1, -1, 0: (0,1) right, (0,2) right, (1,2) wrong. Ranking 2 rewards 0, 1: wrong.
    # Ranking 3 is all tied: no pair.
    assert implicit_reward_accuracy(policy, reference, ranks) == {"accuracy": 2 / 4, "pairs": 4}
    # The policy equal to its reference: every implicit reward 0, every pair a tie, chance.
    assert implicit_reward_accuracy(reference, reference, ranks) == {"accuracy": 0.5, "pairs": 4}
    assert implicit_reward_accuracy([], [], []) == {"accuracy": None, "pairs": 0}


def load_policy(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_sequence_logprobs_sum_the_reply_tokens_and_eos_and_start_at_log_2(tiny_model_dirs):
    from ml.generation import chat_prompt_ids

    policy, tokenizer = load_policy(tiny_model_dirs[0])
    rankings = [
        Ranked([{"role": "user", "content": "Hello"}], ["Hi there!", "Go away.", "4"], [1, 3, 2]),
        Ranked([{"role": "user", "content": "What is 2 + 2? Think carefully."}], ["4", "five, I think"], [1, 2]),
    ]

    with torch.no_grad():
        logps = sequence_logprobs(policy, tokenizer, rankings, max_length=128)
        again = sequence_logprobs(policy, tokenizer, rankings[::-1], max_length=128)[::-1]
        # The same figures from unpadded rows, token by token: the reply's tokens and EOS after the prompt.
        for ranking, sums in zip(rankings, logps, strict=True):
            assert sums.shape == (len(ranking.candidates),)
            prompt, _ = chat_prompt_ids(tokenizer, ranking.context, max_prompt_tokens=96)
            for candidate, value in zip(ranking.candidates, sums, strict=True):
                reply = [*tokenizer.encode(candidate, add_special_tokens=False), tokenizer.eos_token_id]
                logits = policy(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
                expected = logits.gather(-1, torch.tensor(reply)[:, None]).sum().item()
                assert value.item() == pytest.approx(expected, rel=1e-4)

    # Policy == reference: the implicit rewards are 0 and every ranking's loss is log 2, smoothed or not.
    for policy_logps, reference_logps, ranking in zip(logps, again, rankings, strict=True):
        assert torch.allclose(policy_logps, reference_logps, atol=1e-4)
        for smoothing in (0.0, 0.2):
            loss = dpo_ranking_loss(policy_logps, policy_logps, ranking.ranks, beta=0.1, label_smoothing=smoothing)
            assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def assert_merged_safetensors_policy(output_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = sorted(p.name for p in output_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]
    assert not (output_dir / "adapter_config.json").exists()
    assert not [key for key in load_file(output_dir / "model.safetensors") if "lora" in key or "base_layer" in key]
    return AutoModelForCausalLM.from_pretrained(output_dir)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"train_top_layers": 1, "learning_rate": 3e-3}, id="top-layer"),
        pytest.param(
            {"train_top_layers": 1, "learning_rate": 3e-3, "length_normalize": True, "beta": 5.0},
            id="length-normalised",
        ),
        pytest.param({"train_top_layers": 1, "learning_rate": 3e-3, "length_balance": True}, id="length-balanced"),
        pytest.param(
            {"lora": True, "lora_rank": 8, "lora_alpha": 16, "learning_rate": 3e-3, "label_smoothing": 0.1,
             "sft_coef": 0.1},
            id="lora-cdpo-rpo",
        ),
    ],
)  # fmt: skip
def test_dpo_learns_a_visible_preference(tiny_model_dirs, tmp_path, overrides):
    config = DPOConfig(**({"epochs": 3, "rankings_per_batch": 4, "max_length": 64, "beta": 0.5} | overrides))
    train = synthetic_rankings(40, seed=1)
    output_dir = tmp_path / "out"
    seen = []
    progress = Progress(sink=lambda p: seen.append(p.step))

    result = train_dpo(
        config,
        train,
        synthetic_rankings(20, seed=2),
        policy_dir=tiny_model_dirs[0],
        output_dir=output_dir,
        holdout=synthetic_rankings(15, seed=3),
        progress=progress,
    )

    metrics = result.metrics
    assert metrics["train_rankings"] == 32  # the 8 all-tied rankings are dropped
    assert metrics["train_pairs"] == sum(
        sum(a < b for a in r.ranks for b in r.ranks) for r in train
    )  # fmt: skip
    assert metrics["val_accuracy_initial"] == 0.5, metrics  # the policy is its own reference: every pair a tie
    assert metrics["val_accuracy"] >= 0.9, metrics
    assert metrics["holdout_accuracy"] >= 0.9, metrics
    assert metrics["holdout_pairs"] > 0
    assert metrics["reward_margin_last"] > 0
    assert metrics["chosen_reward_last"] > metrics["rejected_reward_last"]
    assert metrics["reward_margin_last"] == pytest.approx(
        metrics["chosen_reward_last"] - metrics["rejected_reward_last"], abs=1e-5
    )
    losses = [value for _, value in result.series["dpo/train_loss"]]
    assert len(losses) == 3 * 8 and seen[-1] == 24
    # The first step: the policy is its reference, to the bit (same rows, same padding), so every reward is 0
    # and each pair's loss is log 2 (length balancing weighs the pairs whose winner is longer down).
    if config.length_balance:
        assert 0 < losses[0] < math.log(2) and metrics["longer_winner_weight"] < 1, (losses[0], metrics)
    else:
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert result.series["dpo/reward_margin"][0][1] == result.series["dpo/chosen_reward"][0][1] == 0.0
    assert result.series["dpo/reward_accuracy"][0][1] == 0.5
    assert min(losses) < 0.6 * math.log(2), losses
    if config.label_smoothing == 0:  # (cDPO's loss cannot go below the entropy of its smoothing, 0.33 for 0.1)
        assert sum(losses[-4:]) / 4 < 0.5 * math.log(2), losses
    assert [step for step, _ in result.series["dpo/val_accuracy"]] == [0, 8, 16, 24]
    for name in ("reward_margin", "reward_accuracy", "learning_rate", "chosen_reward", "rejected_reward"):
        assert len(result.series[f"dpo/{name}"]) == 24, name
    assert ("dpo/sft_loss" in result.series) == (config.sft_coef > 0)

    reloaded = assert_merged_safetensors_policy(output_dir)
    original = load_policy(tiny_model_dirs[0])[0]
    changed = {
        name
        for (name, tensor), reference in zip(reloaded.state_dict().items(), original.state_dict().values(), strict=True)
        if not torch.equal(tensor, reference)
    }
    if config.lora:
        assert changed and all("proj" in name for name in changed), changed
    else:
        assert changed and all(name.startswith(("model.layers.1.", "model.norm")) for name in changed), changed


@pytest.mark.parametrize("when", ["reference-pass", "training"])
def test_cancellation_stops_the_run_and_writes_nothing(tiny_model_dirs, tmp_path, when):
    output_dir = tmp_path / "out"
    progress = Progress()
    progress.should_stop = (lambda: True) if when == "reference-pass" else (lambda: progress.step >= 2)

    with pytest.raises(Cancelled):
        train_dpo(
            DPOConfig(max_length=64, rankings_per_batch=2),
            synthetic_rankings(12, seed=4),
            synthetic_rankings(4, seed=5),
            policy_dir=tiny_model_dirs[0],
            output_dir=output_dir,
            progress=progress,
        )
    assert progress.step == (0 if when == "reference-pass" else 2)
    assert "dpo/train_loss" in progress.series or when == "reference-pass"
    assert not output_dir.exists()


def test_top_layer_dpo_on_kept_frozen_states_trains_like_the_full_pass(tiny_model_dirs, tmp_path):
    config = DPOConfig(epochs=2, rankings_per_batch=4, max_length=64, beta=0.5, train_top_layers=1, learning_rate=1e-3)
    runs = {}
    for cached in (True, False):
        runs[cached] = train_dpo(
            DPOConfig(**{**config.__dict__, "cache_frozen_blocks": cached}),
            synthetic_rankings(24, seed=1),
            synthetic_rankings(10, seed=2),
            policy_dir=tiny_model_dirs[0],
            output_dir=tmp_path / f"out-{cached}",
        )
    cached, full = ([v for _, v in runs[flag].series["dpo/train_loss"]] for flag in (True, False))
    assert cached[0] == pytest.approx(math.log(2), abs=1e-6), "the kept states reproduce the reference exactly"
    assert cached == pytest.approx(full, abs=2e-3), "the same losses step by step"
    assert cached[-1] < cached[0]
    assert runs[True].metrics["val_accuracy"] == pytest.approx(runs[False].metrics["val_accuracy"], abs=0.05)
