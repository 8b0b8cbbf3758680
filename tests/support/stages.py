"""A training stage that exists only in the tests (tests/training_jobs/test_stages.py): a trainer that copies the
starting policy and reports what it was given, behind a config dataclass of its own."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ml.runs import TrainResult


@dataclass
class CopyConfig:
    note: str = ""
    epochs: int = 1


def train_copy(config: CopyConfig, *, train, validation, holdout, policy_dir: Path, output_dir: Path, progress):
    """The starting policy, unchanged, as this stage's model: what the runner handed over is in its metrics."""
    progress.start(1)
    shutil.copytree(policy_dir, output_dir, dirs_exist_ok=True)
    (output_dir / "given.json").write_text(json.dumps({"train": len(train), "validation": len(validation)}))
    progress.advance()
    return TrainResult(
        output_dir=output_dir,
        metrics={"train_rankings": len(train), "note": config.note, "epochs": config.epochs},
    )
