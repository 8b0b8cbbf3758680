"""The loop's policy step on each path, run through the training worker's runner with tiny models: DPO on the
rankings of the starting policy's own samples (and only new ones in the next round), RLOO against a reward model."""

import pytest
from django.test import override_settings

from labeling import splits
from labeling.models import Ranking, Task
from models_service.models import ModelVersion
from tests.support.factories import UserFactory
from tests.support.models import register_tiny_policy
from tests.support.training import ranked_task
from training_jobs import runner, services
from training_jobs.models import TrainingRun

pytestmark = pytest.mark.django_db

FAST_DPO = {"epochs": 2, "learning_rate": 1e-3, "max_length": 64, "train_top_layers": 1, "beta": 0.5}


def rankings_sampled_by(version, labeler, *, train: int, validation: int, start: int = 0) -> list[int]:
    """Finished rankings whose candidates `version` sampled (as the sampling worker records it)."""
    before = set(Ranking.objects.values_list("pk", flat=True))
    for i in range(train):
        ranked_task(splits.TRAIN, start + i, labeler)
    for i in range(validation):
        ranked_task(splits.VALIDATION, start + 100 + i, labeler)
    new = Ranking.objects.exclude(pk__in=before)
    Task.objects.filter(rankings__in=new).update(model_version=version)
    return sorted(new.values_list("pk", flat=True))


@override_settings(TRAINING_MIN_RANKINGS=4)
def test_dpo_rounds_train_on_the_starting_policys_new_rankings_only(tiny_policy, tiny_model_dirs):
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v0", stage="sft")
    ModelVersion.objects.filter(pk=sft.pk).update(parent=tiny_policy)
    labeler = UserFactory(username="ranker")
    first = rankings_sampled_by(sft, labeler, train=6, validation=2)
    ranked_task(splits.TRAIN, 900, labeler)  # sampled by an unrelated policy: not this lineage's
    run = services.training_run_create(kind="dpo", config=FAST_DPO, base_model=sft)
    assert runner.execute(run.pk) == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    snapshot = run.data_snapshot["rankings"]
    assert sorted(snapshot["train_ids"] + snapshot["validation_ids"]) == first
    assert snapshot["validation_count"] == 2
    dpo = ModelVersion.objects.get(training_run=run)
    assert (dpo.kind, dpo.stage, dpo.parent, dpo.is_active) == ("policy", "dpo", sft, False)
    assert run.summary["val_accuracy_initial"] == 0.5 and run.summary["train_rankings"] == 6
    assert not Ranking.objects.filter(pk__in=first, used_in_training_at__isnull=True).exists()

    again = services.training_run_create(kind="dpo", config=FAST_DPO, base_model=dpo)
    assert runner.execute(again.pk) == TrainingRun.Status.FAILED
    again.refresh_from_db()
    assert "Not enough data for DPO" in again.error and "0 rankings in the training split" in again.error

    second = rankings_sampled_by(dpo, labeler, train=5, validation=1, start=500)
    third = services.training_run_create(kind="dpo", config=FAST_DPO, base_model=dpo)
    assert runner.execute(third.pk) == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=third.pk).error
    third.refresh_from_db()
    trained = third.data_snapshot["rankings"]["train_ids"] + third.data_snapshot["rankings"]["validation_ids"]
    assert sorted(trained) == second, "the next round trains on the new rankings only"
    assert third.data_snapshot["left_out_trained_before"] == 8
    assert ModelVersion.objects.get(training_run=third).parent == dpo


@override_settings(TRAINING_MIN_PROMPTS=2)
def test_an_rloo_run_optimises_against_the_reward_model_and_registers_its_policy(tiny_policy, tiny_model_dirs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labeler = UserFactory(username="ranker")
    for i in range(3):
        ranked_task(splits.TRAIN, i, labeler)
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v0", stage="sft")
    staging = tiny_model_dirs[1].parent / "rloo-reward"
    if not staging.exists():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs[1], num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[1])
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    rm = register_tiny_policy(staging, name="reward-rm-v0", stage="rm", kind="reward")
    config = {"iterations": 2, "prompts_per_iteration": 2, "k": 2, "max_new_tokens": 4, "missing_eos_penalty": None}
    run = services.training_run_create(kind="rloo", config=config)
    assert (run.reward_model_id, run.base_model_id) == (rm.pk, None), "the newest reward model, the start resolved"
    assert runner.execute(run.pk) == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    assert run.base_model == sft and run.data_snapshot["reward_model"] == "reward-rm-v0"
    version = ModelVersion.objects.get(training_run=run)
    assert (version.stage, version.parent) == ("rloo", sft)
    assert run.summary["episodes"] == 8 and "rloo/mean_reward" in run.metrics


def test_rloo_and_ppo_refuse_without_a_reward_model(tiny_policy):
    from django.core.exceptions import ValidationError

    for kind in ("rloo", "ppo"):
        with pytest.raises(ValidationError, match=f"{kind.upper()} needs a reward model"):
            services.training_run_create(kind=kind)
    assert services.training_run_create(kind="dpo").reward_model is None, "DPO trains without one"
