"""The architecture's rules (pyproject.toml's import-linter contracts) hold, and would catch a break."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chat", "config", "labeling", "ml", "models_service", "ops", "training_jobs")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root)}
    )


def test_the_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_view_reaching_torch_and_a_trainer_importing_django_break_them(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "labeling" / "views.py").open("a") as views:
        views.write("\nfrom ml.generation import sample_completions  # noqa\n")
    with (tmp_path / "ml" / "sft.py").open("a") as trainer:
        trainer.write("\nfrom django.conf import settings  # noqa\n")
    with (tmp_path / "labeling" / "selectors.py").open("a") as selectors:
        selectors.write("\nfrom training_jobs.models import TrainingRun  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "0 kept, 3 broken" in result.stdout, result.stdout[-3000:]
    assert "labeling.views -> ml.generation" in result.stdout
    assert "ml.sft -> django" in result.stdout
    assert "labeling.selectors -> training_jobs.models" in result.stdout
