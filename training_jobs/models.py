"""Training runs: one row per SFT, reward-model or PPO run, from queued to a registered model or an error."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class TrainingRun(models.Model):
    class Kind(models.TextChoices):
        SFT = "sft", "Supervised fine-tuning"
        RM = "rm", "Reward model"
        PPO = "ppo", "PPO"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Started by a person"
        SCHEDULE = "schedule", "Retraining policy"
        CHAIN = "chain", "Previous stage of the chain"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    kind = models.CharField(max_length=8, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.MANUAL)
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    previous_run = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="next_runs",
        help_text="The run of the previous stage that started this one.",
    )
    base_model = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="runs_as_base",
        help_text="The policy the run starts from.",
    )
    reward_model = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="runs_as_reward",
        help_text="PPO: the reward model optimised against.",
    )
    config = models.JSONField(default=dict, blank=True)
    data_snapshot = models.JSONField(default=dict, blank=True, help_text="The counts and ids of the rows used.")
    seed = models.BigIntegerField(default=0)
    library_versions = models.JSONField(default=dict, blank=True)
    progress_step = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True, help_text="Series: name -> [[step, value], ...].")
    summary = models.JSONField(default=dict, blank=True, help_text="Final metrics.")
    log_tail = models.TextField(blank=True)
    error = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=255, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=Q(status__in=["queued", "running"]), name="training_run_one_active_per_kind"
            ),
            models.CheckConstraint(
                condition=Q(progress_step__lte=F("progress_total")) | Q(progress_total=0),
                name="training_run_progress_within_total",
            ),
            models.CheckConstraint(condition=~Q(status="failed") | ~Q(error=""), name="training_run_failure_has_error"),
            models.CheckConstraint(
                condition=~Q(status__in=["succeeded", "failed", "cancelled"]) | Q(finished_at__isnull=False),
                name="training_run_finished_has_time",
            ),
        ]

    def __str__(self):
        return f"{self.get_kind_display()} run #{self.pk} ({self.status})"

    @property
    def progress_fraction(self) -> float:
        return self.progress_step / self.progress_total if self.progress_total else 0.0

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or self.heartbeat_at or self.started_at
        return (end - self.started_at).total_seconds()
