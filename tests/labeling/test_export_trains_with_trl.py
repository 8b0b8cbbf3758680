"""The exported files load with `datasets` and train with stock TRL, unmodified (tiny models, 2 steps each)."""

import gzip
import itertools
from pathlib import Path

import pytest
from django.conf import settings

from labeling.exporting import ExportFilters, write_export
from labeling.services.records import import_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def first_lines(name: str, n: int) -> list[bytes]:
    with gzip.open(Path(settings.SHARED_DATA_DIR) / name, "rb") as lines:
        return list(itertools.islice(lines, n))


@pytest.fixture
def exported(tmp_path):
    import json

    from labeling.importing import self_instruct_record

    hh = first_lines("hh_rlhf_harmless_base_sample.jsonl.gz", 24)
    import_jsonl(lambda: iter(hh), format="hh", dataset="hh")
    demos = []
    for line in first_lines("self_instruct_seed_tasks.jsonl.gz", 24):
        record = self_instruct_record(json.loads(line), dataset="si")
        messages = [{"role": t.role, "content": t.content} for t in record.context]
        demos.append(json.dumps({"messages": [*messages, {"role": "assistant", "content": record.reply}]}).encode())
    import_jsonl(lambda: iter(demos), format="demonstrations")
    counts = write_export(tmp_path / "export", ExportFilters(include_heldout=True))
    assert counts["sft"] == 24 and counts["preferences"] == 24
    return tmp_path / "export"


def test_exports_load_and_train_with_trl(exported, tiny_model_dirs, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    sft = load_dataset("json", data_files=str(exported / "sft.jsonl"), split="train")
    preferences = load_dataset("json", data_files=str(exported / "preferences.jsonl"), split="train")
    rankings = load_dataset("json", data_files=str(exported / "rankings.jsonl"), split="train")
    assert sft.num_rows == 24 and preferences.num_rows == 24 and rankings.num_rows == 24
    assert set(preferences.column_names) >= {"prompt", "chosen", "rejected"}

    policy = str(tiny_model_dirs[0])
    tokenizer = AutoTokenizer.from_pretrained(policy)
    common = {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": [], "save_strategy": "no", "use_cpu": True}
    sft_trainer = SFTTrainer(
        model=policy,
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=128, **common),
        train_dataset=sft,
        processing_class=tokenizer,
    )
    assert sft_trainer.train().global_step == 2

    reward_model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_trainer = RewardTrainer(
        model=reward_model,
        args=RewardConfig(output_dir=str(tmp_path / "rm"), max_length=128, **common),
        train_dataset=preferences,
        processing_class=tokenizer,
    )
    assert reward_trainer.train().global_step == 2
