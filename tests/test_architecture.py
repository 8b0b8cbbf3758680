"""The architecture's rules (pyproject.toml's import-linter contracts) hold, and would catch a break."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "labeling", "ml", "models_service", "ops", "sampling", "training_jobs")
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


def private_imports(source: str) -> list[str]:
    """Names starting with one underscore that `source` imports from another module, or reads from a module it
    imported (`module._name`)."""
    import ast

    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
                elif node.module and node.module.split(".")[0] in PACKAGES:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not node.value.id[:1].isupper()  # a class's attributes (Model._meta is Django's API)
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports("from ml.ppo import _cycle\nfrom ml import rl\nrl._scores()") == [
        "ml.ppo._cycle",
        "rl._scores",
    ]
    offenders = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            names = private_imports(path.read_text())
            if names:
                offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, offenders
