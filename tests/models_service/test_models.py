import pytest
from django.db import IntegrityError, transaction

from models_service.models import ModelVersion
from tests.support.factories import ModelVersionFactory

pytestmark = pytest.mark.django_db


def test_one_active_model_per_kind():
    ModelVersionFactory(is_active=True)
    ModelVersionFactory(kind=ModelVersion.Kind.REWARD, stage="rm", is_active=True)
    with pytest.raises(IntegrityError, match="model_version_one_active_per_kind"), transaction.atomic():
        ModelVersionFactory(is_active=True)


def test_stage_matches_kind():
    with pytest.raises(IntegrityError, match="model_version_stage_matches_kind"), transaction.atomic():
        ModelVersionFactory(kind=ModelVersion.Kind.POLICY, stage="rm")
    with pytest.raises(IntegrityError, match="model_version_stage_matches_kind"), transaction.atomic():
        ModelVersionFactory(kind=ModelVersion.Kind.REWARD, stage="sft")


def test_only_a_ready_model_can_be_active():
    with pytest.raises(IntegrityError, match="model_version_only_ready_is_active"), transaction.atomic():
        ModelVersionFactory(status=ModelVersion.Status.PENDING, is_active=True)


def test_lineage_runs_from_the_base():
    base = ModelVersionFactory(name="base")
    sft = ModelVersionFactory(name="sft", stage="sft", parent=base)
    ppo = ModelVersionFactory(name="ppo", stage="ppo", parent=sft)
    assert [v.name for v in ppo.lineage] == ["base", "sft", "ppo"]
