"""Supervised fine-tuning with a tiny model on CPU."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ml.runs import Cancelled, Progress
from ml.sft import IGNORE, SFTConfig, encode, train_sft


def chats(n: int, offset: int = 0) -> list[list[dict]]:
    return [
        [
            {"role": "user", "content": f"Question number {i}: is the sky blue?"},
            {"role": "assistant", "content": "Yes, the sky is blue on a clear day."},
        ]
        for i in range(offset, offset + n)
    ]


def test_the_loss_is_on_the_assistant_reply_only(tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[0])
    ids, labels = encode(tokenizer, chats(1)[0], max_length=256)
    learned = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(learned) == "Yes, the sky is blue on a clear day.<|im_end|>"
    prompt = tokenizer.decode(ids[: labels.index(learned[0])])
    assert prompt.endswith("<|im_start|>assistant\n") and "Question number 0" in prompt


def test_sft_lowers_the_validation_loss(tiny_model_dirs, tmp_path):
    config = SFTConfig(epochs=3, learning_rate=3e-3, batch_size=8, max_length=128)
    result = train_sft(
        config, chats(40), chats(8, offset=100), base_dir=tiny_model_dirs[0], output_dir=tmp_path / "sft"
    )
    assert result.metrics["val_loss"] < result.metrics["val_loss_initial"] * 0.6, result.metrics
    assert result.metrics["best_epoch"] >= 1
    assert len(result.series["sft/val_loss"]) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert isinstance(model, torch.nn.Module) and (tmp_path / "sft" / "model.safetensors").is_file()


def test_sft_with_lora_saves_a_merged_model(tiny_model_dirs, tmp_path):
    config = SFTConfig(epochs=1, learning_rate=1e-2, batch_size=8, max_length=128, lora=True, lora_rank=4)
    result = train_sft(
        config, chats(16), chats(4, offset=50), base_dir=tiny_model_dirs[0], output_dir=tmp_path / "lora"
    )
    assert result.metrics["val_loss"] <= result.metrics["val_loss_initial"]
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")


def test_a_cancelled_run_stops_and_writes_nothing(tiny_model_dirs, tmp_path):
    progress = Progress(should_stop=lambda: True)
    try:
        train_sft(
            SFTConfig(epochs=2),
            chats(16),
            chats(4),
            base_dir=tiny_model_dirs[0],
            output_dir=tmp_path / "x",
            progress=progress,
        )
    except Cancelled:
        pass
    else:
        raise AssertionError("the run should have stopped")
    assert not (tmp_path / "x").exists()


def test_training_only_the_top_layers(tiny_model_dirs, tmp_path):
    from ml.modeling import train_top_layers_only

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])
    total = sum(p.numel() for p in model.parameters())
    trained = train_top_layers_only(model, 1)
    assert 0 < trained < total
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert model.model.layers[-1].self_attn.q_proj.weight.requires_grad and model.model.norm.weight.requires_grad
    config = SFTConfig(epochs=3, learning_rate=3e-3, batch_size=8, max_length=128, train_top_layers=1)
    result = train_sft(
        config, chats(40), chats(8, offset=100), base_dir=tiny_model_dirs[0], output_dir=tmp_path / "top"
    )
    assert result.metrics["val_loss"] < result.metrics["val_loss_initial"]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[0])
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "top")
    assert torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(before.model.layers[-1].mlp.up_proj.weight, after.model.layers[-1].mlp.up_proj.weight)
