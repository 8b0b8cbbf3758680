"""A new algorithm is its ml/ module plus one entry in config/stages.py: a stage added there, and nowhere else,
is on the ops page, in admin, among the loop's paths, in the loop's plan and in the runner."""

import pytest
from django.test import override_settings

from config import stages
from models_service.models import ModelVersion
from tests.support.factories import UserFactory
from tests.support.models import register_tiny_policy
from tests.support.training import set_loop
from tests.training_jobs.test_policy_paths import rankings_sampled_by
from training_jobs import loop, runner, services
from training_jobs.models import LoopSettings, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake_stage():
    stage = stages.register(
        stages.Stage(
            "kto",
            "KTO (test)",
            stages.POLICY,
            stages.POLICY_RANKINGS,
            "tests.support.stages:train_copy",
            "tests.support.stages:CopyConfig",
            {"note": "from the declaration", "epochs": 3},
            policy_step=True,
            description="a stage the tests declare",
        )
    )
    yield stage
    stages.unregister("kto")


def test_a_stage_declared_once_is_everywhere(fake_stage, client, admin_user, tiny_policy):
    client.force_login(admin_user)
    overview = client.get("/ops/").content.decode()
    assert 'data-testid="retrain-kto"' in overview and "KTO (test)" in overview
    loop_settings = client.get(f"/admin/training_jobs/loopsettings/{LoopSettings.load().pk}/change/")
    assert '<option value="kto">KTO (test)</option>' in loop_settings.content.decode()
    runs = client.get("/admin/training_jobs/trainingrun/").content.decode()
    assert "?kind__exact=kto" in runs, "the runs' filter by kind"
    assert (
        "kto" in stages.policy_steps() and ("kto", "KTO (test)") in LoopSettings._meta.get_field("policy_path").choices
    )
    settings = set_loop(policy_path="kto")
    settings.full_clean()


@override_settings(TRAINING_MIN_RANKINGS=2)
def test_the_loop_plans_it_and_the_runner_trains_it(fake_stage, tiny_policy, tiny_model_dirs):
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v0", stage="sft")
    ModelVersion.objects.filter(pk=sft.pk).update(parent=tiny_policy)
    register_tiny_policy(tiny_model_dirs[0], name="reward-v0", stage="rm", kind="reward")
    rankings_sampled_by(sft, UserFactory(username="ranker"), train=3, validation=1)
    set_loop(policy_path="kto", sft_threshold=10_000, rm_threshold=10_000)

    decision = loop.loop_tick(force_check=True)
    assert decision.action == "kto" and "KTO (test)" in decision.reason
    run = TrainingRun.objects.get(kind="kto")
    assert run.get_kind_display() == "KTO (test)" and run.base_model == sft

    assert runner.execute(run.pk) == TrainingRun.Status.SUCCEEDED, TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    assert run.summary["train_rankings"] == 3 and run.summary["note"] == "from the declaration"
    assert run.data_snapshot["config"] == {"note": "from the declaration", "epochs": 3}
    version = ModelVersion.objects.get(training_run=run)
    assert (version.kind, version.stage, version.get_stage_display()) == ("policy", "kto", "KTO (test)")
    assert loop.plan(LoopSettings.load(), now=run.finished_at, check_thresholds=False).action == "evaluate"


def test_an_unknown_kind_is_refused_with_the_declared_ones(tiny_policy):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="use one of sft, rm, ppo, dpo, rloo"):
        services.training_run_create(kind="grpo")
