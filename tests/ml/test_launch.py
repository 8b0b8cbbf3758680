"""SFT and the reward model under `accelerate launch` with 2 CPU processes (gloo), against one process.

Each process takes its rows of every batch and scales its loss so that the averaged gradient is the one process's
(ml/parallel.py): the launch must reach the same validation loss and accuracy as one process, up to the order in
which floating-point sums are added. Then the worker's side: progress comes through, a cancel stops every rank and
leaves no model, a failing launch says why.
"""

import os
import time
from pathlib import Path

import psutil
import pytest

from ml.launch import Launch, train
from ml.reward import RewardConfig
from ml.runs import Cancelled, Progress, TrainingFailed
from ml.sft import SFTConfig
from tests.ml.test_reward import synthetic_rankings
from tests.ml.test_sft import chats

pytestmark = pytest.mark.slow

DDP = Path(__file__).resolve().parents[2] / "config" / "accelerate" / "ddp.yaml"
TWO = Launch(config_file=DDP, num_processes=2, poll_s=0.2)


def varied_chats(n: int, offset: int = 0) -> list[list[dict]]:
    """Chats of different lengths, so batches are padded and split unevenly between the processes."""
    return [
        [*chat[:-1], {"role": "assistant", "content": chat[-1]["content"] + " Really." * (i % 4)}]
        for i, chat in enumerate(chats(n, offset))
    ]


def test_sft_on_two_processes_reaches_the_validation_loss_of_one(tiny_model_dirs, tmp_path):
    # 21 examples in batches of 8: the last batch has 5 rows, split 3 + 2.
    config = SFTConfig(epochs=2, learning_rate=3e-3, batch_size=8, max_length=128)
    data = {"train_chats": varied_chats(21), "validation_chats": varied_chats(7, offset=100)}
    one = train("sft", config, launch=None, progress=Progress(), base_dir=tiny_model_dirs[0],
                output_dir=tmp_path / "one", **data)  # fmt: skip
    progress = Progress(interval_s=0.1)
    two = train("sft", config, launch=TWO, progress=progress, base_dir=tiny_model_dirs[0],
                output_dir=tmp_path / "two", **data)  # fmt: skip

    assert one.metrics["processes"] == 1 and two.metrics["processes"] == 2
    assert two.metrics["val_loss_initial"] == pytest.approx(one.metrics["val_loss_initial"], rel=1e-5)
    assert two.metrics["val_loss"] < two.metrics["val_loss_initial"] * 0.8, two.metrics
    assert two.metrics["val_loss"] == pytest.approx(one.metrics["val_loss"], rel=2e-3), (one.metrics, two.metrics)
    assert two.metrics["best_epoch"] == one.metrics["best_epoch"]
    assert two.metrics["train_tokens"] == one.metrics["train_tokens"], "every row trained once, by one process"
    # The run's progress came through from the launch: its steps, series and log.
    assert progress.step == progress.total == 6
    assert len(progress.series["sft/train_loss"]) == 6 and len(progress.series["sft/val_loss"]) == 3
    assert any("launching sft with accelerate" in line for line in progress.log)
    assert any("done in 2 process(es)" in line for line in progress.log)
    assert (tmp_path / "two" / "model.safetensors").is_file() and (tmp_path / "two" / "config.json").is_file()


def test_the_reward_model_on_two_processes_learns_as_on_one(tiny_model_dirs, tmp_path):
    config = RewardConfig(epochs=2, learning_rate=2e-3, rankings_per_batch=8, max_length=64, seed=0)
    data = {
        "train": synthetic_rankings(44, seed=1),  # 6 batches, the last of 4 rankings
        "validation": synthetic_rankings(15, seed=2),
        "holdout": synthetic_rankings(9, seed=3),
        "demonstrations": [([{"role": "user", "content": "Hi"}], "river banana garden")] * 3,
    }
    one = train("rm", config, launch=None, progress=Progress(), base_dir=tiny_model_dirs[0],
                output_dir=tmp_path / "one", **data)  # fmt: skip
    two = train("rm", config, launch=TWO, progress=Progress(), base_dir=tiny_model_dirs[0],
                output_dir=tmp_path / "two", **data)  # fmt: skip

    assert two.metrics["processes"] == 2
    for key in ("val_accuracy", "holdout_accuracy", "val_pairs", "holdout_pairs"):
        assert two.metrics[key] == one.metrics[key], (key, one.metrics, two.metrics)
    assert two.metrics["reward_offset"] == pytest.approx(one.metrics["reward_offset"], abs=2e-3)
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_a_cancelled_launch_stops_every_process_and_leaves_no_model(tiny_model_dirs, tmp_path):
    config = SFTConfig(epochs=200, learning_rate=1e-3, batch_size=2, max_length=128)
    asked = []

    def should_stop():
        asked.append(time.monotonic())
        return len(asked) > 1 and progress.step >= 2  # once the ranks are training

    progress = Progress(should_stop=should_stop, interval_s=0.1)
    children_before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    with pytest.raises(Cancelled):
        train("sft", config, launch=TWO, progress=progress, base_dir=tiny_model_dirs[0],
              output_dir=tmp_path / "out", train_chats=chats(40), validation_chats=chats(4, 100))  # fmt: skip
    assert 2 <= progress.step < progress.total
    left = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in children_before]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], left
    assert not (tmp_path / "out").exists()


def test_a_failing_launch_says_why(tiny_model_dirs, tmp_path):
    config = SFTConfig(epochs=1, batch_size=2, max_length=128)
    with pytest.raises(TrainingFailed, match="under accelerate launch failed"):
        train("sft", config, launch=TWO, progress=Progress(), base_dir=tmp_path / "no-such-model",
              output_dir=tmp_path / "out", train_chats=chats(4), validation_chats=chats(2, 100))  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.django_db
def test_a_training_run_under_a_launch_registers_its_model(tiny_policy, settings):
    """The training worker's runner with TRAINING_ACCELERATE_CONFIG: the run's progress and log come from the launch,
    and its complete model is registered as a run in one process would register it."""
    from labeling import splits
    from models_service.models import ModelVersion
    from tests.support.training import demonstration
    from training_jobs import runner, services
    from training_jobs.models import TrainingRun

    settings.TRAINING_ACCELERATE_CONFIG, settings.TRAINING_NUM_PROCESSES = str(DDP), 2
    settings.TRAINING_MIN_DEMONSTRATIONS, settings.TRAINING_REPORT_INTERVAL_S = 8, 0.2
    for split, count in ((splits.TRAIN, 10), (splits.VALIDATION, 3)):
        for i in range(count):
            demonstration(split, i)
    run = services.training_run_create(kind="sft", config={"epochs": 1, "batch_size": 4, "max_length": 96})
    status = runner.execute(run.pk, worker="test")
    assert status == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    assert run.summary["processes"] == 2 and run.progress_step == run.progress_total == 3
    assert "launching sft with accelerate" in run.log_tail and "registered" in run.log_tail
    assert {"sft/train_loss", "sft/val_loss"} <= set(run.metrics)
    version = ModelVersion.objects.get(training_run=run)
    assert (version.artifact_dir / "model.safetensors").is_file() and not services.staging_dir(run).exists()
