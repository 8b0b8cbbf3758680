"""The reward model: `train_reward(config, data, ...) -> TrainResult`.

A scalar head on the SFT (or base) policy (AutoModelForSequenceClassification, num_labels=1), trained with the
InstructGPT loss: all C(K,2) ordered pairs of one ranking form ONE batch element. The K candidates of a ranking
go through the model once each, and the loss is `-mean log sigma(r_w - r_l)` over the ranking's pairs; ties give
no pair. Flattening the pairs into independent examples would cost a forward pass per pair and overfit, since
each reply would be seen K - 1 times (bench/training.py measures the cost side).

After training, the scores are shifted so that labeler demonstrations average 0 (the shift is stored in the
config as `reward_offset`, which ml.scoring adds).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ml.device import autocast, cpu_bf16, limit_allocator_caching, seed_everything, training_device
from ml.generation import left_pad
from ml.modeling import (
    FrozenBlocks,
    apply_lora,
    cosine_schedule,
    save_model,
    train_top_layers_only,
    transformer_blocks,
    unwrapped,
)
from ml.parallel import DataParallel
from ml.runs import Progress, TrainResult
from ml.scoring import REWARD_OFFSET, pair_input_ids, score_head, sequence_scores


@dataclass
class RewardConfig:
    epochs: int = 1
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.05
    rankings_per_batch: int = 4
    max_length: int = 512
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = False
    train_top_layers: int = 0  # 0: all; n: only the top n transformer blocks (and the heads) learn, for CPUs
    # With train_top_layers: run the frozen blocks once per reply and keep what enters the lowest trained block,
    # so that every later epoch and every validation pass costs only the trained blocks.
    cache_frozen_blocks: bool = True
    head_learning_rate: float | None = None  # the scalar head's own rate (None: learning_rate)
    lora_rank: int = 16
    lora_alpha: int = 32
    seed: int = 0
    normalise_on_demonstrations: bool = True
    # Keep the weights of the epoch with the best validation accuracy (the earliest among equals), not the last:
    # a reward model on a few hundred rankings can overfit after its first epoch.
    keep_best_epoch: bool = True


@dataclass
class Ranked:
    """What the trainer needs of a ranking: the context, the K candidate replies, and their ranks (1 = best)."""

    context: list[dict]
    candidates: list[str]
    ranks: list[int]


def ranking_pairs(ranks: list[int]) -> tuple[list[int], list[int]]:
    """Indices (winners, losers) of every ordered pair of a ranking; tied candidates give no pair."""
    winners, losers = [], []
    for i, rank_i in enumerate(ranks):
        for j, rank_j in enumerate(ranks):
            if rank_i < rank_j:
                winners.append(i)
                losers.append(j)
    return winners, losers


def ranking_loss(scores: torch.Tensor, ranks: list[int]) -> torch.Tensor | None:
    """InstructGPT's loss for ONE ranking: the mean over its C(K,2) pairs of -log sigma(r_w - r_l).
    None when every candidate is tied (no pair)."""
    winners, losers = ranking_pairs(ranks)
    if not winners:
        return None
    return -F.logsigmoid(scores[winners] - scores[losers]).mean()


class RewardBlocks(FrozenBlocks):
    """FrozenBlocks for a reward model: rows are (chat, reply) pairs as the reward model reads them, and the score
    is the scalar head on the last position (what `sequence_scores` computes on the whole model)."""

    def row(self, chat: list[dict], reply: str) -> list[int]:
        return pair_input_ids(self.tokenizer, chat, reply, max_tokens=self.max_length)

    def add_pairs(self, pairs: list[tuple[list[dict], str]], *, progress: Progress | None = None) -> None:
        self.add([self.row(c, r) for c, r in pairs], progress=progress)

    def scores(self, pairs: list[tuple[list[dict], str]]) -> torch.Tensor:
        """Scores of the pairs (differentiable in the trained blocks and the head)."""
        hidden, _ = self.hidden([self.row(c, r) for c, r in pairs])
        offset = float(getattr(unwrapped(self.model).config, REWARD_OFFSET, 0.0) or 0.0)
        with autocast():
            return score_head(self.model)(hidden[:, -1, :]).squeeze(-1).float() + offset

    @torch.no_grad()
    def matches_full_model(self, pairs: list[tuple[list[dict], str]], tolerance: float = 1e-3) -> bool:
        rows = [self.row(c, r) for c, r in pairs]
        ids, mask = left_pad(rows, self.pad_id, next(self.model.parameters()).device)
        with autocast():
            full = sequence_scores(self.model, ids, mask)
        if cpu_bf16():  # bf16 matmuls round at the third significant digit, in either path
            tolerance = max(tolerance, 0.05 * float(full.abs().max()) + 0.05)
        return bool(torch.allclose(self.scores(pairs), full, atol=tolerance, rtol=1e-3))


class Scorer(torch.nn.Module):
    """`sequence_scores` as a module's forward pass, so that a launch's wrapper (DDP, DeepSpeed) sees the training
    forward it must synchronise: the reward model's head reads the backbone directly, not the model's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return sequence_scores(self.model, input_ids, attention_mask)


def _score_candidates(
    model,
    tokenizer,
    rankings: list[Ranked],
    max_length: int,
    device,
    frozen: RewardBlocks | None = None,
    scorer=None,
) -> list[torch.Tensor]:
    """One forward pass over all candidates of the given rankings (K rows each); scores split per ranking.
    `scorer`: the prepared Scorer of a launch (training steps only)."""
    if frozen is not None:
        scores = frozen.scores([(r.context, candidate) for r in rankings for candidate in r.candidates])
        return list(torch.split(scores, [len(r.candidates) for r in rankings]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [
        pair_input_ids(tokenizer, r.context, candidate, max_tokens=max_length)
        for r in rankings
        for candidate in r.candidates
    ]
    ids, mask = left_pad(rows, pad_id, device)
    with autocast():
        scores = scorer(ids, mask) if scorer is not None else sequence_scores(model, ids, mask)
    return list(torch.split(scores, [len(r.candidates) for r in rankings]))


@torch.no_grad()
def pairwise_accuracy(
    model,
    tokenizer,
    rankings: list[Ranked],
    *,
    max_length: int,
    batch_size: int = 8,
    frozen: RewardBlocks | None = None,
    parallel: DataParallel | None = None,
) -> dict:
    """Share of ordered (non-tied) pairs the model scores in the labelers' order (each process of a launch scores
    its share of the rankings; the counts are added up)."""
    parallel = parallel or DataParallel()
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    rankings = parallel.share(rankings)
    for start in range(0, len(rankings), batch_size):
        chunk = rankings[start : start + batch_size]
        scored = _score_candidates(model, tokenizer, chunk, max_length, device, frozen)
        for scores, ranking in zip(scored, chunk, strict=True):
            winners, losers = ranking_pairs(ranking.ranks)
            correct += int((scores[winners] > scores[losers]).sum()) if winners else 0
            total += len(winners)
    model.train()
    correct, total = (int(v) for v in parallel.total(correct, total))
    return {"accuracy": correct / total if total else None, "pairs": total}


@torch.no_grad()
def mean_score(
    model,
    tokenizer,
    pairs: list[tuple[list[dict], str]],
    *,
    max_length: int,
    batch_size: int = 16,
    parallel: DataParallel | None = None,
) -> float:
    parallel = parallel or DataParallel()
    count = len(pairs)
    pairs = parallel.share(pairs)
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        rows = [
            pair_input_ids(tokenizer, chat, reply, max_tokens=max_length)
            for chat, reply in pairs[start : start + batch_size]
        ]
        ids, mask = left_pad(rows, pad_id, device)
        with autocast():
            total += float(sequence_scores(model, ids, mask).sum())
    model.train()
    return parallel.total(total)[0] / max(count, 1)


def load_reward_model(base_dir: Path, *, dtype, device):
    """The policy at `base_dir` with its LM head replaced by a scalar head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=dtype).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer


def train_reward(
    config: RewardConfig,
    train: list[Ranked],
    validation: list[Ranked],
    *,
    base_dir: Path,
    output_dir: Path,
    holdout: list[Ranked] = (),
    demonstrations: list[tuple[list[dict], str]] = (),
    progress: Progress | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Train the reward model on rankings; report pairwise accuracy on `validation` and on `holdout` (e.g. a
    held-out slice of imported HH-RLHF pairs); shift scores so `demonstrations` (chat, reply) average 0.
    With `parallel` (under `accelerate launch`), each process takes its rankings of every batch (ml/parallel.py)
    and the main process writes the model; the frozen blocks' cache is a one-process CPU economy and stays off."""
    progress = progress or Progress()
    parallel = parallel or DataParallel()
    seed_everything(config.seed)
    limit_allocator_caching()
    device, dtype = training_device()
    device = parallel.device or device
    model, tokenizer = load_reward_model(base_dir, dtype=dtype, device=device)
    if config.lora:
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, task_type="SEQ_CLS")
    else:
        train_top_layers_only(model, config.train_top_layers)
    model.train()
    train = [r for r in train if ranking_pairs(r.ranks)[0]]
    steps_per_epoch = (len(train) + config.rankings_per_batch - 1) // config.rankings_per_batch
    total_steps = steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = {id(p) for p in score_head(model).parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in head]}]
    groups.append(
        {"params": [p for p in trainable if id(p) in head], "lr": config.head_learning_rate or config.learning_rate}
    )
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    progress.start(total_steps)
    frozen = None
    cache = config.cache_frozen_blocks and not config.lora and not parallel.distributed
    if cache and 0 < config.train_top_layers < len(transformer_blocks(model)):
        started = time.monotonic()
        frozen = RewardBlocks(model, tokenizer, trained_blocks=config.train_top_layers, max_length=config.max_length)
        frozen.add_pairs([(r.context, c) for r in [*train, *validation] for c in r.candidates], progress=progress)
        if not frozen.matches_full_model([(r.context, c) for r in train[:2] for c in r.candidates]):
            frozen = None  # a backbone that transforms inputs_embeds (e.g. Gemma scales them): run the full model
            progress.message("kept states do not reproduce the full model's scores here: every epoch runs all blocks")
    if frozen is not None:
        progress.message(
            f"the {frozen.below} frozen blocks ran once over {len(frozen.states)} "
            f"replies in {time.monotonic() - started:.0f} s; epochs run the top {config.train_top_layers} only"
        )
    schedule = cosine_schedule(optimizer, total_steps=total_steps, warmup_steps=int(config.warmup_ratio * total_steps))
    scorer = None
    if parallel.distributed:
        scorer, optimizer = parallel.prepare(Scorer(model), optimizer)
    progress.message(
        f"reward model on {len(train)} rankings ({sum(len(ranking_pairs(r.ranks)[0]) for r in train)} pairs), "
        f"{len(validation)} for validation"
    )
    generator = torch.Generator().manual_seed(config.seed)
    best = None  # (accuracy, epoch, the trainable parameters then)
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), config.rankings_per_batch):
            chunk = [train[i] for i in order[start : start + config.rankings_per_batch]]
            weight = 1.0
            if parallel.distributed:  # every ranking of `train` gives pairs, so each counts once in the mean
                rows, weight = parallel.rows(len(chunk))
                batch, chunk = len(chunk), [chunk[i] for i in rows]
            scores = _score_candidates(model, tokenizer, chunk, config.max_length, device, frozen, scorer)
            losses = [ranking_loss(s, r.ranks) for s, r in zip(scores, chunk, strict=True)]
            if parallel.distributed:
                local = torch.stack(losses).sum()
                loss = parallel.scale(local, batch, weight)
                reported = parallel.total(float(local) * weight)[0] / batch
            else:
                loss = torch.stack([x for x in losses if x is not None]).mean()
                reported = loss.item()
            optimizer.zero_grad(set_to_none=True)
            parallel.backward(loss)
            parallel.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            progress.metric("rm/train_loss", reported)
            progress.advance()
        measured = pairwise_accuracy(
            model, tokenizer, validation, max_length=config.max_length, frozen=frozen, parallel=parallel
        )
        if measured["accuracy"] is not None:
            progress.metric("rm/val_accuracy", measured["accuracy"])
        progress.message(f"epoch {epoch}/{config.epochs}: validation pairwise accuracy {measured['accuracy']}")
        kept = config.keep_best_epoch and config.epochs > 1 and measured["accuracy"] is not None
        if kept and (best is None or measured["accuracy"] > best[0]):
            best = (measured["accuracy"], epoch, [p.detach().clone() for p in trainable])
    last_accuracy = measured["accuracy"]
    if best is not None and best[1] != config.epochs:
        with torch.no_grad():
            for parameter, value in zip(trainable, best[2], strict=True):
                parameter.copy_(value)
        measured = {**measured, "accuracy": best[0]}
        progress.message(f"kept epoch {best[1]}'s weights (validation accuracy {best[0]}, last {last_accuracy})")

    metrics = {
        "val_accuracy": measured["accuracy"],
        "val_accuracy_last_epoch": last_accuracy,
        "kept_epoch": best[1] if best is not None else config.epochs,
        "val_pairs": measured["pairs"],
        "train_rankings": len(train),
        "validation_rankings": len(validation),
        "processes": parallel.world,
    }
    if holdout:
        held = pairwise_accuracy(model, tokenizer, list(holdout), max_length=config.max_length, parallel=parallel)
        metrics.update(holdout_accuracy=held["accuracy"], holdout_pairs=held["pairs"])
        progress.message(f"held-out pairwise accuracy {held['accuracy']} over {held['pairs']} pairs")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if config.normalise_on_demonstrations and demonstrations:
        setattr(model.config, REWARD_OFFSET, 0.0)
        offset = -mean_score(model, tokenizer, list(demonstrations), max_length=config.max_length, parallel=parallel)
        setattr(model.config, REWARD_OFFSET, offset)
        metrics["reward_offset"] = round(offset, 6)
        progress.message(f"scores shifted by {offset:+.4f} so that {len(demonstrations)} demonstrations average 0")
    if parallel.is_main:
        save_model(model, tokenizer, output_dir)
    parallel.wait()
    progress.flush(force=True)
    return TrainResult(output_dir=output_dir, metrics=metrics, series=progress.series)
