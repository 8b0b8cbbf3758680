"""Direct Preference Optimisation from K-way rankings: `train_dpo(config, train, validation, ...) -> TrainResult`.

DPO (Rafailov et al. 2023) trains the policy on the labelers' rankings directly, without a reward model or RL:
the implicit reward of a reply is `r = beta * (log pi(y|x) - log pi_ref(y|x))`, the sum of the log-probs of the
reply's tokens (its text and the end-of-turn token, after the prompt rendered as the sampler renders it, which is
what `ml.sft.encode` trains on) under the policy and under the frozen reference. As in the reward model
(ml/reward.py), all C(K,2) ordered pairs of one ranking form ONE batch element: the K candidates go
through the policy once each, and the ranking's loss is the mean over its non-tied pairs of
`-log sigma(r_w - r_l)` (with cDPO's label smoothing `ls`: `-(1 - ls) log sigma(d) - ls log sigma(-d)`). Rankings
whose candidates are all tied give no pair and are dropped.

Length (R-DPO, Park et al. 2024, "Disentangling Length from Quality in DPO"): when labelers' preferred replies are
longer on average, plain DPO learns "longer" along with whatever they preferred, and the served replies grow. With
`length_penalty` alpha > 0 each pair's margin becomes `r_w - r_l + alpha (|y_w| - |y_l|)` (|y| in reply tokens):
the length share of a preference is explained by the alpha term, so the policy's implicit reward does not have to
grow with length. 0 is plain DPO. With `length_normalize` (length-normalised DPO, as Tulu 3 trains with it) the
implicit reward is beta times the mean log-ratio per reply token instead of the sum: a longer reply no longer
accumulates reward token by token, so lengthening replies stops being the easy way to widen a margin. The mean is
a fiftieth of the sum for a 50-token reply, hence a beta of about 5 instead of 0.1. With `length_balance` the pairs
whose winner is the longer reply are weighed down until, over the training pairs, winners are no longer than losers
on average (`longer_winner_weight`): where labelers' preferred replies happen to be longer, the policy cannot learn
"longer" as the shortcut to their preference, while a preference for shorter replies is left whole.

The reference is the policy as loaded from `policy_dir` (the SFT policy). Its log-probs never change, so they are
computed once, before the first update, for every train, validation and holdout ranking. That is what the policy
with its LoRA adapters disabled, or a frozen copy, would give later, without a second copy of the weights in
memory and without a reference forward pass at each step.

A batch of `rankings_per_batch` rankings is one optimizer step, but each ranking's K candidates go forward and
backward on their own (gradients accumulate): activations for one ranking at a time keep the default model
within a few GB on the CPU.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ml.device import (
    autocast,
    cpu_bf16,
    limit_allocator_caching,
    release_freed_memory,
    seed_everything,
    training_device,
)
from ml.generation import left_pad
from ml.modeling import FrozenBlocks, apply_lora, cosine_schedule, save_model, train_top_layers_only, transformer_blocks
from ml.reward import Ranked, ranking_pairs
from ml.rl import disable_dropout
from ml.runs import Progress, TrainResult
from ml.scoring import reply_token_logprobs, target_logprobs
from ml.sft import IGNORE, encode


@dataclass
class DPOConfig:
    epochs: int = 2
    learning_rate: float = 5e-6
    beta: float = 0.1
    warmup_ratio: float = 0.1
    rankings_per_batch: int = 4
    max_length: int = 384
    max_grad_norm: float = 1.0
    lora: bool = False
    train_top_layers: int = 0  # 0: all; n: only the top n transformer blocks (and the heads) learn, for CPUs
    cache_frozen_blocks: bool = True  # with train_top_layers: the frozen blocks run once per reply (FrozenBlocks)
    lora_rank: int = 16
    lora_alpha: int = 32
    seed: int = 0
    label_smoothing: float = 0.0  # conservative DPO (cDPO): the share of labels assumed flipped; 0 = plain DPO
    sft_coef: float = 0.0  # NLL on each ranking's best candidate(s), an RPO-style regulariser; 0 = off
    length_penalty: float = 0.0  # R-DPO's alpha, per reply token: + alpha (|y_w| - |y_l|) in each margin; 0 = off
    length_normalize: bool = False  # the implicit reward on the mean log-ratio per reply token (LN-DPO; beta ~5)
    length_balance: bool = False  # weigh down pairs whose winner is longer until winners are not longer on average


# --- log-probs, losses and accuracy ---


def _rows(tokenizer, rankings: list[Ranked], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token rows (prompt, reply, end-of-turn) of every candidate, and how many reply tokens each has."""
    rows, lengths = [], []
    for ranking in rankings:
        for candidate in ranking.candidates:
            encoded = encode(tokenizer, [*ranking.context, {"role": "assistant", "content": candidate}], max_length)
            if encoded is None:
                raise ValueError(f"max_length {max_length} leaves no room for a reply")
            ids, labels = encoded
            rows.append(ids)
            lengths.append(sum(label != IGNORE for label in labels))
    return rows, lengths


def _candidate_logprobs(model, tokenizer, rankings: list[Ranked], max_length: int, frozen: FrozenBlocks | None = None):
    """One forward pass over all candidates of `rankings`: per candidate, the sum of its reply tokens' log-probs
    and the number of those tokens, split per ranking. Differentiable unless the caller disables gradients.
    With `frozen`, only the trained top blocks run, on the kept states of the frozen ones."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, lengths = _rows(tokenizer, rankings, max_length)
    ids, mask = left_pad(rows, pad_id, device)
    lengths = torch.tensor(lengths, device=device)
    width = int(lengths.max())
    if frozen is not None:
        hidden, _ = frozen.hidden(rows)
        with autocast():
            logits = model.get_output_embeddings()(hidden[:, -(width + 1) :, :])
        token_logprobs, reply = target_logprobs(logits, ids, lengths)
    else:
        with autocast():
            token_logprobs, reply = reply_token_logprobs(model, ids, mask, lengths)
    sums = torch.where(reply, token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)
    sizes = [len(r.candidates) for r in rankings]
    return list(torch.split(sums, sizes)), list(torch.split(lengths, sizes))


def sequence_logprobs(
    model, tokenizer, rankings: list[Ranked], max_length: int, frozen: FrozenBlocks | None = None
) -> list[torch.Tensor]:
    """For each ranking, a [K] tensor: the sum of the log-probs of each candidate's reply tokens (its text and the
    end-of-turn token) after the prompt the sampler renders (`chat_prompt_ids`). One forward pass over all the
    candidates given; differentiable unless the caller disables gradients."""
    return _candidate_logprobs(model, tokenizer, rankings, max_length, frozen)[0]


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of each candidate: beta * (log pi - log pi_ref)."""
    return beta * (policy_logps - ref_logps)


def dpo_ranking_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    ranks: list[int],
    beta: float,
    label_smoothing: float = 0.0,
    *,
    lengths: torch.Tensor | None = None,
    length_penalty: float = 0.0,
    longer_winner_weight: float = 1.0,
) -> torch.Tensor | None:
    """DPO's loss for ONE ranking: the mean over its ordered non-tied pairs (w, l) of
    `-(1 - ls) log sigma(d) - ls log sigma(-d)`, d = r_w - r_l, plus R-DPO's `length_penalty * (|y_w| - |y_l|)`
    with the candidates' reply `lengths` in tokens; a pair whose winner is longer counts `longer_winner_weight`
    (length balancing, below). None when every candidate is tied (no pair)."""
    winners, losers = ranking_pairs(ranks)
    if not winners:
        return None
    rewards = implicit_rewards(policy_logps, ref_logps, beta)
    margin = rewards[winners] - rewards[losers]
    if length_penalty:
        if lengths is None:
            raise ValueError("length_penalty needs the candidates' reply lengths")
        sizes = lengths.to(margin.dtype)
        margin = margin + length_penalty * (sizes[winners] - sizes[losers])
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if longer_winner_weight != 1.0:
        if lengths is None:
            raise ValueError("length balancing needs the candidates' reply lengths")
        longer = lengths[winners] > lengths[losers]
        weights = torch.where(longer, longer_winner_weight, 1.0).to(loss.dtype)
        return (loss * weights).sum() / len(winners)
    return loss.mean()


def longer_winner_weight(rankings: list[Ranked], lengths: list[list[int]]) -> float:
    """Length balancing: the weight of the pairs whose winner is the longer reply, so that over all pairs the
    winners are no longer than the losers on average (sum of the weighted length differences 0). 1 when winners
    are not longer on average: only a bias toward length is taken out (verbosity, the way DPO's replies grow when
    labelers' preferred replies happen to be longer); a preference for shorter replies is left to be learnt."""
    longer = shorter = 0
    for ranking, sizes in zip(rankings, lengths, strict=True):
        for winner, loser in zip(*ranking_pairs(ranking.ranks), strict=True):
            difference = sizes[winner] - sizes[loser]
            longer, shorter = longer + max(difference, 0), shorter + max(-difference, 0)
    return shorter / longer if longer > shorter else 1.0


def implicit_reward_accuracy(
    policy_logps: list[torch.Tensor], ref_logps: list[torch.Tensor], ranks: list[list[int]]
) -> dict:
    """Share of the ordered (non-tied) pairs whose implicit rewards are in the labelers' order, over rankings.
    An exact tie of implicit rewards counts half (so the policy equal to its reference scores 0.5, chance).
    Returns {"accuracy": share or None without pairs, "pairs": count}; beta > 0 does not change the order."""
    score = 0.0
    total = 0
    for policy, reference, ranking_ranks in zip(policy_logps, ref_logps, ranks, strict=True):
        winners, losers = ranking_pairs(ranking_ranks)
        if not winners:
            continue
        rewards = (policy - reference).detach()
        margin = rewards[winners] - rewards[losers]
        score += float((margin > 0).sum()) + 0.5 * float((margin == 0).sum())
        total += len(winners)
    return {"accuracy": score / total if total else None, "pairs": total}


@torch.no_grad()
def _all_logprobs(
    model,
    tokenizer,
    rankings: list[Ranked],
    max_length: int,
    progress: Progress,
    frozen: FrozenBlocks | None = None,
    normalize: bool = False,
) -> list[torch.Tensor]:
    """Log-prob sums of every candidate (with `normalize`, means per reply token), in eval mode, without gradients;
    stops when the run is cancelled.

    One ranking per forward pass, as in training: the rows are padded exactly as when the policy sees them, so the
    policy's first log-probs match the reference's (exactly on the CPU: every implicit reward is 0 at step 0), and
    the [K, tokens, vocab] logits of one ranking bound the memory."""
    was_training = model.training
    model.eval()
    logps = []
    if frozen is not None:
        frozen.add(_rows(tokenizer, rankings, max_length)[0], progress=progress)  # batched by length, once
    for ranking in rankings:
        sums, lengths = _candidate_logprobs(model, tokenizer, [ranking], max_length, frozen)
        logps.append((sums[0] / lengths[0] if normalize else sums[0]).cpu())
        progress.advance(0)  # raises Cancelled (a long pass over the data with the default model)
    model.train(was_training)
    return logps


def _accuracy(model, tokenizer, rankings, reference, config: DPOConfig, progress: Progress, frozen=None) -> dict:
    logps = _all_logprobs(model, tokenizer, rankings, config.max_length, progress, frozen, config.length_normalize)
    return implicit_reward_accuracy(logps, reference, [r.ranks for r in rankings])


@torch.no_grad()
def _frozen_matches(model, tokenizer, ranking: Ranked, max_length: int, frozen: FrozenBlocks) -> bool:
    full = sequence_logprobs(model, tokenizer, [ranking], max_length)[0]
    kept = sequence_logprobs(model, tokenizer, [ranking], max_length, frozen)[0]
    tolerance = 0.05 * float(full.abs().max()) + 0.5 if cpu_bf16() else 1e-2  # bf16 rounds at the 3rd digit
    return bool(torch.allclose(full, kept, atol=tolerance, rtol=1e-4))


# --- the run ---


def train_dpo(
    config: DPOConfig,
    train: list[Ranked],
    validation: list[Ranked],
    *,
    policy_dir: Path,
    output_dir: Path,
    holdout: list[Ranked] = (),
    progress: Progress | None = None,
) -> TrainResult:
    """Train the policy at `policy_dir` with DPO on rankings and save it (LoRA merged, safetensors) to `output_dir`.

    Reports the implicit-reward pairwise accuracy on `validation` before training (0.5: the policy is its own
    reference) and after each epoch, and on `holdout` at the end. Raises Cancelled (from `progress.advance`)
    when the run is cancelled, and then writes nothing to `output_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.beta <= 0:
        raise ValueError("DPO's beta must be positive")
    if not 0 <= config.label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    if config.length_penalty < 0:
        raise ValueError("length_penalty must be 0 (plain DPO) or positive (R-DPO)")
    if min(config.epochs, config.rankings_per_batch) < 1:
        raise ValueError("epochs and rankings_per_batch must be at least 1")
    train = [r for r in train if ranking_pairs(r.ranks)[0]]
    validation = [r for r in validation if ranking_pairs(r.ranks)[0]]
    holdout = [r for r in holdout if ranking_pairs(r.ranks)[0]]
    if not train:
        raise ValueError("DPO needs at least one ranking with a preference (not all candidates tied)")
    progress = progress or Progress()
    started = time.monotonic()
    seed_everything(config.seed)
    limit_allocator_caching()
    device, dtype = training_device()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype).to(device)
    disable_dropout(model)  # dropout would make the policy differ from its reference before any update

    steps_per_epoch = (len(train) + config.rankings_per_batch - 1) // config.rankings_per_batch
    total_steps = steps_per_epoch * config.epochs
    progress.start(total_steps)
    train_pairs = sum(len(ranking_pairs(r.ranks)[0]) for r in train)
    progress.message(
        f"DPO on {len(train)} rankings ({train_pairs} pairs), {len(validation)} for validation, "
        f"{len(holdout)} held out; reference log-probs first"
    )
    frozen = None
    if config.cache_frozen_blocks and not config.lora and 0 < config.train_top_layers < len(transformer_blocks(model)):
        frozen = FrozenBlocks(model, tokenizer, trained_blocks=config.train_top_layers, max_length=config.max_length)
        if not _frozen_matches(model, tokenizer, train[0], config.max_length, frozen):
            frozen = None
            progress.message("kept states do not reproduce the full model here: every step runs all blocks")
    balance = 1.0
    if config.length_balance:
        sizes = [_rows(tokenizer, [ranking], config.max_length)[1] for ranking in train]
        balance = longer_winner_weight(train, sizes)
        progress.message(f"length balancing: pairs whose winner is longer count {balance:.3f}")
    # The reference: the policy before any update. Its log-probs never change, so they are computed once.
    reference = {
        name: _all_logprobs(model, tokenizer, rankings, config.max_length, progress, frozen, config.length_normalize)
        for name, rankings in (("train", train), ("validation", validation), ("holdout", holdout))
    }
    release_freed_memory()
    initial = implicit_reward_accuracy(reference["validation"], reference["validation"], [r.ranks for r in validation])
    if initial["accuracy"] is not None:
        progress.metric("dpo/val_accuracy", initial["accuracy"], step=0)

    if config.lora:
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha)
    else:
        train_top_layers_only(model, config.train_top_layers)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, total_steps=total_steps, warmup_steps=int(config.warmup_ratio * total_steps))

    generator = torch.Generator().manual_seed(config.seed)
    last: dict = {}
    measured = initial
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), config.rankings_per_batch):
            picked = order[start : start + config.rankings_per_batch]
            optimizer.zero_grad(set_to_none=True)
            figures = {"loss": 0.0, "sft_loss": 0.0, "chosen": 0.0, "rejected": 0.0, "pairs": 0}
            policy_logps, ref_logps = [], []
            for index in picked:
                ranking = train[index]
                sums, lengths = _candidate_logprobs(model, tokenizer, [ranking], config.max_length, frozen)
                logps, reference_logps = sums[0], reference["train"][index].to(device)
                if config.length_normalize:
                    logps = logps / lengths[0]
                loss = dpo_ranking_loss(
                    logps,
                    reference_logps,
                    ranking.ranks,
                    config.beta,
                    config.label_smoothing,
                    lengths=lengths[0],
                    length_penalty=config.length_penalty,
                    longer_winner_weight=balance,
                )
                figures["loss"] += loss.item() / len(picked)
                if config.sft_coef > 0:
                    best = [i for i, rank in enumerate(ranking.ranks) if rank == min(ranking.ranks)]
                    nll = -sums[0][best].sum() / lengths[0][best].sum()
                    figures["sft_loss"] += nll.item() / len(picked)
                    loss = loss + config.sft_coef * nll
                (loss / len(picked)).backward()
                rewards = implicit_rewards(logps.detach(), reference_logps, config.beta)
                winners, losers = ranking_pairs(ranking.ranks)
                figures["chosen"] += float(rewards[winners].sum())
                figures["rejected"] += float(rewards[losers].sum())
                figures["pairs"] += len(winners)
                policy_logps.append(logps.detach())
                ref_logps.append(reference_logps)
                del sums, lengths, logps, loss
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            accuracy = implicit_reward_accuracy(policy_logps, ref_logps, [train[i].ranks for i in picked])
            last = {
                "chosen_reward": figures["chosen"] / figures["pairs"],
                "rejected_reward": figures["rejected"] / figures["pairs"],
            }
            last["reward_margin"] = last["chosen_reward"] - last["rejected_reward"]
            progress.metric("dpo/train_loss", figures["loss"])
            if config.sft_coef > 0:
                progress.metric("dpo/sft_loss", figures["sft_loss"])
            progress.metric("dpo/reward_margin", last["reward_margin"])
            progress.metric("dpo/chosen_reward", last["chosen_reward"])
            progress.metric("dpo/rejected_reward", last["rejected_reward"])
            progress.metric("dpo/reward_accuracy", accuracy["accuracy"])
            progress.metric("dpo/learning_rate", schedule.get_last_lr()[0])
            progress.advance()
        release_freed_memory()
        measured = _accuracy(model, tokenizer, validation, reference["validation"], config, progress, frozen)
        if measured["accuracy"] is not None:
            progress.metric("dpo/val_accuracy", measured["accuracy"])
        progress.message(
            f"epoch {epoch}/{config.epochs}: validation implicit-reward accuracy {measured['accuracy']}, "
            f"last margin {last['reward_margin']:.4f}"
        )

    held = {"accuracy": None, "pairs": 0}
    if holdout:
        held = _accuracy(model, tokenizer, holdout, reference["holdout"], config, progress, frozen)
        progress.message(f"held-out implicit-reward accuracy {held['accuracy']} over {held['pairs']} pairs")
    metrics = {
        "val_accuracy_initial": initial["accuracy"],
        "val_accuracy": measured["accuracy"],
        "val_pairs": measured["pairs"],
        "holdout_accuracy": held["accuracy"],
        "holdout_pairs": held["pairs"],
        "train_rankings": len(train),
        "train_pairs": train_pairs,
        "longer_winner_weight": round(balance, 4),
        "validation_rankings": len(validation),
        "reward_margin_last": round(last["reward_margin"], 6),
        "chosen_reward_last": round(last["chosen_reward"], 6),
        "rejected_reward_last": round(last["rejected_reward"], 6),
        "seconds": round(time.monotonic() - started, 1),
    }
    save_model(model, tokenizer, Path(output_dir))
    progress.flush(force=True)
    return TrainResult(Path(output_dir), metrics=metrics, series=progress.series)
