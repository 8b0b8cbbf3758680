"""The model registry: every policy and reward model the loop has produced, and which ones serve."""

from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q


class ModelVersion(models.Model):
    class Kind(models.TextChoices):
        POLICY = "policy", "Policy"
        REWARD = "reward", "Reward model"

    class Stage(models.TextChoices):
        BASE = "base", "Base"
        SFT = "sft", "Supervised fine-tuning"
        RM = "rm", "Reward model"
        PPO = "ppo", "PPO"

    class Status(models.TextChoices):
        PENDING = "pending", "Being written"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        ARCHIVED = "archived", "Archived"

    name = models.CharField(max_length=128, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    stage = models.CharField(max_length=16, choices=Stage.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children", help_text="Trained from."
    )
    training_run = models.ForeignKey(
        "training_jobs.TrainingRun",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="produced_models",
    )
    artifact_path = models.CharField(
        max_length=512, unique=True, help_text="Folder under ARTIFACTS_DIR, in save_pretrained layout."
    )
    source = models.CharField(max_length=512, blank=True, help_text="Hub id, local path or wheel it came from.")
    metrics = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=False)
    activated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    notes = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=Q(is_active=True), name="model_version_one_active_per_kind"
            ),
            models.CheckConstraint(
                condition=(Q(kind="reward") & Q(stage="rm")) | (Q(kind="policy") & ~Q(stage="rm")),
                name="model_version_stage_matches_kind",
            ),
            models.CheckConstraint(
                condition=Q(is_active=False) | Q(status="ready"), name="model_version_only_ready_is_active"
            ),
        ]
        ordering = ["-created_at"]

    def __str__(self):
        return self.name

    @property
    def artifact_dir(self) -> Path:
        return Path(settings.ARTIFACTS_DIR) / self.artifact_path

    @property
    def lineage(self) -> list["ModelVersion"]:
        """This version and its ancestors, oldest first."""
        chain, node, seen = [], self, set()
        while node is not None and node.pk not in seen:
            seen.add(node.pk)
            chain.append(node)
            node = node.parent
        return list(reversed(chain))


class ModelActivation(models.Model):
    """The record of every change of the serving model: who, when, why."""

    class Action(models.TextChoices):
        ACTIVATE = "activate", "Activated"
        PROMOTE = "promote", "Promoted after evaluation"
        ROLLBACK = "rollback", "Rolled back"

    kind = models.CharField(max_length=16, choices=ModelVersion.Kind.choices)
    action = models.CharField(max_length=16, choices=Action.choices)
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="activations")
    previous = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="replaced_by_activations"
    )
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    automatic = models.BooleanField(default=False, help_text="Done by the loop, not by a person.")
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.action} {self.model_version}"
