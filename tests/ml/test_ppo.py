"""PPO on tiny real models on the CPU: the reward rises, updates follow the advantage, GAE by hand, the KL guard,
the LoRA reference, the saved folder, cancellation, the missing-EOS penalty and PPO-ptx."""

import math
from pathlib import Path

import pytest
import torch

from ml.ppo import (
    PPOConfig,
    demonstration_loss,
    gae,
    policy_step,
    reward_scores,
    token_rewards,
    token_values,
    train_ppo,
    value_loss,
    whiten,
)
from ml.rl import Rollout, policy_loss, reference_logprobs, response_logprobs, sample_responses
from ml.runs import Cancelled, Progress, TrainingFailed
from tests.support.ppo import PROMPTS, low_byte_fraction


@pytest.fixture(scope="module")
def reward_dirs(tiny_model_dirs, tmp_path_factory):
    """Reward models made from the tiny policy: "random" (its fresh score head) and "neutral" (the head zeroed,
    so the value model, initialised from it, starts at 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy_dir = tiny_model_dirs[0]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    dirs = {}
    for name in ("random", "neutral"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        if name == "neutral":
            with torch.no_grad():
                model.score.weight.zero_()
        dirs[name] = tmp_path_factory.mktemp(f"reward-{name}")
        model.save_pretrained(dirs[name], safe_serialization=True)
        tokenizer.save_pretrained(dirs[name])
    return dirs


def load_policy(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def rollout(policy, tokenizer, chats, *, max_new_tokens=6, seed=0):
    from ml.generation import chat_prompt_ids, eos_ids

    queries = [chat_prompt_ids(tokenizer, chat, max_prompt_tokens=64)[0] for chat in chats]
    config = PPOConfig(max_new_tokens=max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    batch, _, _ = sample_responses(
        policy, queries, pad_id=tokenizer.pad_token_id, stop_ids=eos_ids(policy, tokenizer), config=config,
        generator=generator,
    )  # fmt: skip
    return batch


def fast_config(**overrides) -> PPOConfig:
    """Small and fast; the tiny model almost never ends within 4 tokens, so by default every response is scored
    as it is (missing_eos_penalty=None) rather than all getting the same penalty."""
    values = {
        "iterations": 2,
        "rollout_batch_size": 8,
        "minibatch_size": 4,
        "learning_rate": 3e-3,
        "value_learning_rate": 3e-3,
        "max_new_tokens": 4,
        "missing_eos_penalty": None,
        "lora_rank": 8,
        "lora_alpha": 16,
    }
    return PPOConfig(**(values | overrides))


def test_ppo_raises_a_synthetic_reward_within_the_kl_bound(tiny_model_dirs, reward_dirs, tmp_path):
    config = fast_config(iterations=20, rollout_batch_size=16, minibatch_size=8, ppo_epochs=4)
    result = train_ppo(
        config,
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dirs["neutral"],
        output_dir=tmp_path / "out",
        reward_fn=low_byte_fraction,
    )

    rewards = [value for _, value in result.series["ppo/mean_reward"]]
    assert [step for step, _ in result.series["ppo/mean_reward"]] == list(range(1, 21))
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    kls = [value for _, value in result.series["ppo/kl"]]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the SFT policy itself
    assert max(kls) < config.max_kl
    assert result.metrics["iterations"] == 20
    assert result.metrics["mean_reward_last"] > result.metrics["mean_reward_first"]
    for name in (
        "policy_loss", "value_loss", "clip_fraction", "entropy", "response_length", "approx_kl",
        "explained_variance", "kl_coef",
    ):  # fmt: skip
        assert len(result.series[f"ppo/{name}"]) == 20, name
    assert "ppo/ptx_loss" not in result.series

    # The adapter kept beside the merged weights is the whole change: the starting policy plus the adapter (what a
    # vLLM server running the starting policy loads at promotion) gives the merged model's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    over_parent = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0]), tmp_path / "out" / "adapter"
    ).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.allclose(over_parent(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(
            AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])(ids).logits, merged(ids).logits, atol=1e-4
        )


def test_one_update_moves_logprobs_along_the_advantage(tiny_model_dirs):
    policy, tokenizer = load_policy(tiny_model_dirs[0])
    batch = rollout(policy, tokenizer, PROMPTS[:4])
    with torch.no_grad():
        batch.logprobs = response_logprobs(policy, batch, 1.0)[0]
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None]
    batch.advantages = sign * batch.response_mask
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)

    stats = policy_step(policy, optimizer, batch, PPOConfig())

    assert stats["clip_fraction"] == 0.0  # a first step: the ratio is 1
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        after = response_logprobs(policy.eval(), batch, 1.0)[0]
    change = ((after - batch.logprobs) * batch.response_mask).sum(-1)
    assert (change[:2] > 0).all(), change
    assert (change[2:] < 0).all(), change
    # Most single tokens move with their advantage too, not only the row sums.
    agreeing = ((after - batch.logprobs) * sign > 0)[batch.response_mask.bool()].float().mean()
    assert agreeing > 0.75


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.3, -0.2, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ended after two tokens

    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)

    # Row 1: delta_2 = 1 - 0.1; delta_1 = 0 + 0.1 - 0.2; delta_0 = 0 + 0.2 - 0.5; A_t = delta_t + 0.95 A_{t+1}.
    # Row 2: delta_1 = -0.2 + 0 - 0.4 (nothing after the end); delta_0 = 0.3 + 0.4 - 0.1.
    expected = torch.tensor([[-0.3 + 0.95 * (-0.1 + 0.95 * 0.9), -0.1 + 0.95 * 0.9, 0.9], [0.6 + 0.95 * -0.6, -0.6, 0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)

    gamma_half, _ = gae(rewards[:1], torch.zeros(1, 3), mask[:1], gamma=0.5, lam=1.0)
    assert torch.allclose(gamma_half, torch.tensor([[0.25, 0.5, 1.0]]))


def test_kl_penalty_per_token_and_the_score_at_the_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    rewards, kl = token_rewards(logprobs, ref_logprobs, mask, torch.tensor([3.0, -2.0]), beta=0.1)

    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -2.0, 0.0]]))


def test_clipped_policy_and_value_losses_by_hand():
    ratio = torch.tensor([[1.5, 1.5, 0.5, 1.1]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)

    loss, clip_fraction, approx_kl = policy_loss(ratio.log(), torch.zeros(1, 4), advantages, mask, 0.2)

    # max(-A r, -A clip(r)): -1.2 (clipped), 1.5, 0.8 (clipped), -2.2.
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 2.2) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item())

    values, old_values = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)
    returns = torch.tensor([[2.0, 0.5]])
    # First: max((1 - 2)^2, (0.2 - 2)^2) = 3.24. Second: max((1 - 0.5)^2, (0.2 - 0.5)^2) = 0.25.
    assert value_loss(values, old_values, returns, torch.ones(1, 2), 0.2).item() == pytest.approx(
        0.5 * (3.24 + 0.25) / 2
    )


def test_whitening_gives_mean_zero_and_unit_std_over_the_mask():
    torch.manual_seed(0)
    values = torch.randn(4, 7) * 3 + 5
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 5, 3, 1])[:, None]).float()

    whitened = whiten(values, mask)

    kept = whitened[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (whitened[~mask.bool()] == 0).all()
    unshifted = whiten(values, mask, shift_mean=False)[mask.bool()]
    assert unshifted.mean().item() == pytest.approx(values[mask.bool()].mean().item(), abs=1e-4)
    assert unshifted.std().item() == pytest.approx(1.0, abs=1e-4)


def test_the_kl_guard_stops_a_run_that_drifts(tiny_model_dirs, reward_dirs, tmp_path):
    # Without LoRA (a frozen reference copy, a separate reward model) and with the reward model's own score.
    config = fast_config(iterations=3, max_kl=1e-6, lora=False, learning_rate=1e-3)
    output_dir = tmp_path / "out"

    with pytest.raises(TrainingFailed, match=r"KL \d+\.\d\d exceeded the bound 1e-06: stopped to avoid collapse"):
        train_ppo(
            config,
            prompts=PROMPTS,
            policy_dir=tiny_model_dirs[0],
            reward_dir=reward_dirs["random"],
            output_dir=output_dir,
        )
    assert not output_dir.exists()


def test_lora_reference_is_the_sft_policy(tiny_model_dirs):
    from ml.modeling import apply_lora

    sft, tokenizer = load_policy(tiny_model_dirs[0])
    policy = apply_lora(load_policy(tiny_model_dirs[0])[0], rank=8, alpha=16)
    torch.manual_seed(1)
    with torch.no_grad():  # stand in for training: LoRA's B matrices start at zero
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = rollout(sft, tokenizer, PROMPTS)

    with torch.no_grad():
        sft_logprobs = response_logprobs(sft, batch, 1.0)[0]
        policy_logprobs = response_logprobs(policy.eval(), batch, 1.0)[0]
    reference = reference_logprobs(policy, None, batch, 1.0)

    mask = batch.response_mask.bool()
    assert torch.allclose(reference[mask], sft_logprobs[mask], atol=1e-5)
    assert (policy_logprobs - sft_logprobs)[mask].abs().max() > 0.1  # the adapters are on outside the context
    assert reference_logprobs(policy, sft, batch, 1.0).equal(sft_logprobs)  # the lora=False path: a frozen copy


def test_lora_on_the_top_blocks_leaves_the_lower_blocks_as_they_were(tiny_model_dirs, reward_dirs, tmp_path):
    from safetensors.torch import load_file

    from ml.modeling import apply_lora

    policy = load_policy(tiny_model_dirs[0])[0]
    top = policy.config.num_hidden_layers - 1
    adapted = apply_lora(policy, rank=8, alpha=16, top_layers=1)
    lora_blocks = {name.split(".layers.")[1].split(".")[0] for name, _ in adapted.named_parameters() if "lora_" in name}
    assert lora_blocks == {str(top)}

    config = fast_config(iterations=2, lora_top_layers=1, learning_rate=3e-2)
    train_ppo(
        config,
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dirs["neutral"],
        output_dir=tmp_path / "out",
        reward_fn=low_byte_fraction,
    )
    before = load_file(next(Path(tiny_model_dirs[0]).glob("*.safetensors")))
    after = load_file(next((tmp_path / "out").glob("*.safetensors")))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(f"layers.{top}." in name for name in changed), changed


def test_lora_reward_model_is_the_value_model_with_adapters_disabled(reward_dirs):
    from transformers import AutoModelForSequenceClassification

    from ml.generation import left_pad
    from ml.modeling import apply_lora
    from ml.scoring import sequence_scores

    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dirs["random"]).eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_dirs["random"])
    value_model = apply_lora(value_model, rank=8, alpha=16, task_type="SEQ_CLS").eval()
    torch.manual_seed(2)
    with torch.no_grad():  # stand in for training: the adapters and the score head's trainable copy move
        for parameter in value_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    ids, mask = left_pad([[5, 6, 7, 8, 2], [9, 10, 2]], 0, "cpu")

    with torch.no_grad():
        expected = sequence_scores(reward_model, ids, mask)
        # V(s_0) is the score head on the last prompt token's hidden state: the reward model's reading there.
        batch = Rollout(ids, mask, torch.tensor([[11, 12], [13, 0]]), torch.tensor([[1, 1], [1, 0]]))
        with value_model.disable_adapter():
            initial_values = token_values(value_model, batch)
        trained_values = token_values(value_model, batch)
    assert torch.allclose(reward_scores(None, value_model, ids, mask), expected, atol=1e-5)
    assert torch.allclose(reward_scores(reward_model, None, ids, mask), expected)
    assert torch.allclose(initial_values[:, 0], expected, atol=1e-5)
    assert not torch.allclose(trained_values[:, 0], expected, atol=1e-2)


def test_lora_run_saves_a_merged_safetensors_policy(tiny_model_dirs, reward_dirs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "out"
    seen = []
    progress = Progress(sink=lambda p: seen.append(p.step))
    result = train_ppo(
        fast_config(iterations=2),
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dirs["random"],  # the reward model's own score, not a reward_fn
        output_dir=output_dir,
        progress=progress,
    )

    assert result.output_dir == output_dir
    assert {"iterations", "mean_reward_first", "mean_reward_last", "kl_last"} <= set(result.metrics)
    assert result.series is progress.series and len(progress.log) == 2
    assert seen[-1] == 2
    weights = sorted(p.name for p in output_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]
    assert not (output_dir / "adapter_config.json").exists()
    state = load_file(output_dir / "model.safetensors")
    assert not [key for key in state if "lora" in key or "base_layer" in key]
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])
    changed = [
        name
        for (name, tensor), reference in zip(reloaded.state_dict().items(), original.state_dict().values())
        if not torch.equal(tensor, reference)
    ]
    assert changed and all("proj" in name for name in changed)  # the merged LoRA projections, nothing else


def test_cancellation_stops_the_run_and_writes_nothing(tiny_model_dirs, reward_dirs, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(Cancelled):
        train_ppo(
            fast_config(iterations=5),
            prompts=PROMPTS,
            policy_dir=tiny_model_dirs[0],
            reward_dir=reward_dirs["neutral"],
            output_dir=output_dir,
            progress=Progress(should_stop=lambda: True),
            reward_fn=low_byte_fraction,
        )
    assert not output_dir.exists()


def test_missing_eos_penalty_replaces_the_score_and_ptx_is_logged(tiny_model_dirs, reward_dirs, tmp_path):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dirs[0]).eos_token_id
    calls = []

    def constant_reward(chats, texts, token_ids):
        calls.append(token_ids)
        return [2.0] * len(token_ids)

    demonstrations = [chat + [{"role": "assistant", "content": "Yes, maybe."}] for chat in PROMPTS]
    config = fast_config(iterations=2, max_new_tokens=3, missing_eos_penalty=-1.5, ptx_coef=0.5, ptx_batch_size=2)
    result = train_ppo(
        config,
        prompts=PROMPTS,
        policy_dir=tiny_model_dirs[0],
        reward_dir=reward_dirs["neutral"],
        output_dir=tmp_path / "out",
        ptx_examples=demonstrations,
        reward_fn=constant_reward,
    )

    for (_, mean_reward), token_ids in zip(result.series["ppo/mean_reward"], calls, strict=True):
        expected = [2.0 if ids[-1] == eos else -1.5 for ids in token_ids]
        assert mean_reward == pytest.approx(sum(expected) / len(expected), abs=1e-5)
        assert all(len(ids) <= 3 and (eos not in ids[:-1]) for ids in token_ids)
    ptx = [value for _, value in result.series["ppo/ptx_loss"]]
    assert len(ptx) == 2 and all(0 < value < 20 for value in ptx)


def test_demonstration_loss_covers_the_reply_tokens_only(tiny_model_dirs):
    from ml.generation import chat_prompt_ids, left_pad

    policy, tokenizer = load_policy(tiny_model_dirs[0])
    rows = []
    for prompt, reply in (("Hello", "Hi there!"), ("What is 2 + 2?", "4")):
        ids, _ = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], max_prompt_tokens=64)
        rows.append((ids, [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]))
    ids, mask = left_pad([p + r for p, r in rows], tokenizer.pad_token_id, "cpu")

    with torch.no_grad():
        loss = demonstration_loss(policy, ids, mask, torch.tensor([len(r) for _, r in rows])).item()
        # The same figure from unpadded rows, token by token.
        total, count = 0.0, 0
        for prompt, reply in rows:
            logits = policy(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            total -= logits.gather(-1, torch.tensor(reply)[:, None]).sum().item()
            count += len(reply)
    assert loss == pytest.approx(total / count, rel=1e-4)
    assert math.isfinite(loss)
