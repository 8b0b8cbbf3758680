"""Supervised fine-tuning on demonstrations: `train_sft(config, data, ...) -> TrainResult`.

A small loop of our own rather than TRL's SFTTrainer: it masks the loss to the demonstration's tokens with the
same prompt rendering the sampler uses (chat template plus generation prompt), reports progress, stops on
cancel, and keeps the best epoch by validation loss. bench/training.py measures it against SFTTrainer.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ml.device import autocast, limit_allocator_caching, seed_everything, training_device
from ml.generation import chat_prompt_ids
from ml.modeling import apply_lora, cosine_schedule, save_model, train_top_layers_only
from ml.parallel import DataParallel
from ml.runs import Progress, TrainResult

IGNORE = -100


@dataclass
class SFTConfig:
    epochs: int = 3
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.05
    batch_size: int = 8
    max_length: int = 512
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = False
    train_top_layers: int = 0  # 0: all; n: only the top n transformer blocks (and the heads) learn, for CPUs
    lora_rank: int = 16
    lora_alpha: int = 32
    seed: int = 0


def encode(tokenizer, chat: list[dict], max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of a chat ending with the assistant turn to learn: labels only on that turn (its text
    and end-of-turn token), IGNORE on the prompt. None when nothing of the reply fits."""
    prompt, _ = chat_prompt_ids(tokenizer, chat[:-1], max_prompt_tokens=max_length * 3 // 4)
    reply = tokenizer.encode(chat[-1]["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
    reply = reply[: max_length - len(prompt)]
    if not reply:
        return None
    return prompt + reply, [IGNORE] * len(prompt) + reply


def batches(examples: list[tuple[list[int], list[int]]], size: int, pad_id: int, device, *, shuffle_seed=None):
    """Right-padded batches of (ids, labels), similar lengths together to waste little padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    if shuffle_seed is not None:
        permutation = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        chunks = [chunks[i] for i in permutation]
    for chunk in chunks:
        width = max(len(examples[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            sequence, target = examples[i]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, : len(target)] = torch.tensor(target)
            mask[row, : len(sequence)] = 1
        yield ids.to(device), mask.to(device), labels.to(device)


def token_loss(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the labelled tokens of the batch, and how many there were."""
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    count = int((targets != IGNORE).sum())
    return loss / max(count, 1), count


@torch.no_grad()
def validation_loss(model, examples, batch_size, pad_id, device, parallel: DataParallel | None = None) -> float:
    """Mean token loss over `examples` (each process of a launch scores its share; the sums are added up)."""
    parallel = parallel or DataParallel()
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels in batches(parallel.share(examples), batch_size, pad_id, device):
        loss, n = token_loss(model, ids, mask, labels)
        total += float(loss) * n
        count += n
    model.train()
    total, count = parallel.total(total, count)
    return total / max(count, 1)


def train_sft(
    config: SFTConfig,
    train_chats: list[list[dict]],
    validation_chats: list[list[dict]],
    *,
    base_dir: Path,
    output_dir: Path,
    progress: Progress | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Fine-tune the policy at `base_dir` on the chats' final assistant turns; save the best epoch (lowest
    validation loss) to `output_dir`. With `parallel` (under `accelerate launch`), each process takes its rows of
    every batch (ml/parallel.py) and the main process writes the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress or Progress()
    parallel = parallel or DataParallel()
    seed_everything(config.seed)
    limit_allocator_caching()
    device, dtype = training_device()
    device = parallel.device or device
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    if config.lora:
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha)
    else:
        train_top_layers_only(model, config.train_top_layers)
    model.train()

    train = [e for e in (encode(tokenizer, chat, config.max_length) for chat in train_chats) if e]
    validation = [e for e in (encode(tokenizer, chat, config.max_length) for chat in validation_chats) if e]
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = cosine_schedule(optimizer, total_steps=total_steps, warmup_steps=int(config.warmup_ratio * total_steps))
    inner = model
    model, optimizer = parallel.prepare(model, optimizer)
    progress.start(total_steps)
    initial = validation_loss(model, validation, config.batch_size * 2, pad_id, device, parallel)
    progress.metric("sft/val_loss", initial, step=0)
    progress.message(f"SFT on {len(train)} demonstrations ({len(validation)} for validation); val loss {initial:.4f}")

    best_loss, best_epoch, best_state = initial, 0, None
    tokens, started = 0, time.monotonic()
    for epoch in range(1, config.epochs + 1):
        for ids, mask, labels in batches(train, config.batch_size, pad_id, device, shuffle_seed=config.seed + epoch):
            if parallel.distributed:
                batch_count = int((labels[:, 1:] != IGNORE).sum())
                rows, weight = parallel.rows(len(ids))
                ids, mask, labels = ids[rows], mask[rows], labels[rows]
                mean, count = token_loss(model, ids, mask, labels)
                loss = parallel.scale(mean * count, batch_count, weight)
                reported = parallel.total(float(mean) * count * weight)[0] / max(batch_count, 1)
            else:
                loss, count = token_loss(model, ids, mask, labels)
                reported = loss.item()
            optimizer.zero_grad(set_to_none=True)
            parallel.backward(loss)
            parallel.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            tokens += int(mask.sum())
            progress.metric("sft/train_loss", reported)
            progress.metric("sft/learning_rate", schedule.get_last_lr()[0])
            progress.advance()
        loss = validation_loss(model, validation, config.batch_size * 2, pad_id, device, parallel)
        progress.metric("sft/val_loss", loss)
        progress.message(f"epoch {epoch}/{config.epochs}: validation loss {loss:.4f}")
        if loss < best_loss:
            best_loss, best_epoch = loss, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if _trained(k, inner)}
    elapsed = time.monotonic() - started
    tokens = int(parallel.total(tokens)[0])
    if best_state is not None:
        inner.load_state_dict(best_state, strict=False)
    if parallel.is_main:
        save_model(inner, tokenizer, output_dir)
    parallel.wait()
    progress.flush(force=True)
    return TrainResult(
        output_dir=output_dir,
        metrics={
            "val_loss_initial": round(initial, 6),
            "val_loss": round(best_loss, 6),
            "best_epoch": best_epoch,
            "epochs": config.epochs,
            "train_examples": len(train),
            "validation_examples": len(validation),
            "train_tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
            "processes": parallel.world,
        },
        series=progress.series,
    )


def _trained(key: str, model) -> bool:
    """With LoRA only the adapters change, so only they are kept for the best epoch (a few MB, not the model)."""
    return "lora_" in key if hasattr(model, "peft_config") else True
