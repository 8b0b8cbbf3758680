"""Training runs: one row per run of a stage (config/stages.py), from queued to a registered model or an error."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from config import stages


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Started by a person"
        SCHEDULE = "schedule", "The loop (a threshold was reached)"
        CHAIN = "chain", "Previous stage of the chain"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    kind = models.CharField(max_length=8, choices=stages.run_kind_choices)  # config/stages.py
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
    reason = models.TextField(
        blank=True, help_text="Why a person started the run, when it was a decision (e.g. training below a threshold)."
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
    def label(self) -> str:
        """ "supervised fine-tuning run #4", "DPO run #5": for sentences."""
        kind = self.get_kind_display()
        return f"{kind if kind.isupper() else kind.lower()} run #{self.pk}"

    @property
    def started_by(self) -> str:
        """Who or what started the run, in the same words on every page: "Started by alice", "The loop (a
        threshold was reached)", "Previous stage of the chain"."""
        if self.trigger == self.Trigger.MANUAL and self.triggered_by_id:
            return f"Started by {self.triggered_by}"
        return self.get_trigger_display()

    @property
    def progress_fraction(self) -> float:
        return self.progress_step / self.progress_total if self.progress_total else 0.0

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or self.heartbeat_at or self.started_at
        return (end - self.started_at).total_seconds()


OPERATE_LOOP = "training_jobs.operate_loop"  # the permission behind the ops pages and the admin API


class LoopSettings(models.Model):
    """The retraining policy and the promotion rules. One row, edited in admin or on the ops page."""

    enabled = models.BooleanField(default=True, help_text="Let beat start training runs and evaluations.")
    check_every_minutes = models.PositiveIntegerField(default=10, help_text="How often thresholds are checked.")
    sft_threshold = models.PositiveIntegerField(
        "SFT threshold", default=50, help_text="New accepted demonstrations (not yet trained on) that start an SFT run."
    )
    rm_threshold = models.PositiveIntegerField(
        "reward-model threshold",
        default=80,
        help_text="New rankings that give pairs (not yet trained on) that start a reward-model run.",
    )
    ppo_after_new_models = models.BooleanField(
        "policy step after new models",
        default=True,
        help_text="Start the policy step (the path below) when a new SFT policy or a new reward model is ready.",
    )
    policy_path = models.CharField(
        max_length=8,
        choices=stages.policy_path_choices,
        default=stages.DEFAULT_POLICY_PATH,
        help_text="How rankings improve the policy (config/stages.py has each path); the gate judges all alike.",
    )
    eval_prompts = models.PositiveSmallIntegerField(
        "evaluation prompts", default=32, help_text="Held-out prompts per evaluation."
    )
    eval_max_new_tokens = models.PositiveSmallIntegerField(
        "evaluation reply length", default=96, help_text="At most this many new tokens per evaluation reply."
    )
    auto_promote = models.BooleanField(default=True, help_text="Promote without an admin when the rules hold.")
    min_rm_gain = models.FloatField(
        "minimum reward-model gain", default=0.0, help_text="Mean reward-model score gain over the active policy."
    )
    max_kl = models.FloatField(
        "largest KL", default=20.0, help_text="Largest KL (nats per reply) from the SFT policy allowed."
    )
    refuse_length_only_gain = models.BooleanField(
        default=True,
        help_text="Refuse a candidate with longer replies whose score gain vanishes once both arms' scores are "
        "regressed on reply length: the reward model then pays for length, not quality.",
    )
    min_rm_accuracy = models.FloatField(
        "minimum reward-model accuracy",
        default=0.6,
        help_text="A reward model below this pairwise accuracy on validation rankings is at chance: its score gain "
        "cannot promote a policy, and the gate says so.",
    )
    human_comparisons = models.PositiveSmallIntegerField(
        default=20, help_text="Blind A/B comparison tasks created per evaluation (0: none)."
    )
    require_human_win_rate = models.BooleanField(
        default=False, help_text="Wait for the human A/B result before promoting automatically."
    )
    min_human_comparisons = models.PositiveSmallIntegerField(default=20)
    votes_per_labeler = models.PositiveSmallIntegerField(
        default=5, help_text="Blind A/B comparisons of one evaluation that one labeler may take (0: no limit)."
    )
    min_human_win_rate = models.FloatField(default=0.5)
    paused_reason = models.TextField(
        blank=True, help_text="Set when a stage of the chain failed; the loop waits until it is cleared."
    )
    paused_for = models.CharField(
        max_length=64, blank=True, help_text="The failure the loop paused for (e.g. run:12), so it pauses once."
    )
    last_checked_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = verbose_name_plural = "loop settings"
        # The ops pages and the admin API: given by this permission (the "Ops" group, made after every migrate by
        # training_jobs.apps, has it; superusers have every permission), not by staff status alone, which also
        # lets someone into Django admin for other reasons.
        permissions = [("operate_loop", "Can use the ops pages and the admin API")]
        constraints = [
            models.CheckConstraint(condition=Q(id=1), name="loop_settings_singleton"),
            models.CheckConstraint(condition=Q(check_every_minutes__gte=1), name="loop_settings_interval_positive"),
            models.CheckConstraint(
                condition=Q(min_human_win_rate__gte=0) & Q(min_human_win_rate__lte=1),
                name="loop_settings_win_rate_range",
            ),
        ]

    def __str__(self):
        return "Loop settings"

    def save(self, *args, **kwargs):
        self.pk = 1
        super().save(*args, **kwargs)

    @classmethod
    def load(cls) -> "LoopSettings":
        return cls.objects.get_or_create(pk=1)[0]


class Evaluation(models.Model):
    """The gate before promotion: a candidate policy against the active one on held-out prompts."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    class Decision(models.TextChoices):
        PENDING = "pending", "Not decided yet"
        PROMOTED = "promoted", "Promoted"
        WAITING_FOR_ADMIN = "waiting", "Waiting for an admin"
        WAITING_FOR_HUMANS = "waiting_humans", "Waiting for the human A/B result"
        NOT_PROMOTED = "not_promoted", "Not promoted"

    candidate = models.ForeignKey(
        "models_service.ModelVersion", on_delete=models.PROTECT, related_name="evaluations_as_candidate"
    )
    baseline = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="evaluations_as_baseline",
        help_text="The policy serving when the evaluation ran.",
    )
    reward_model = models.ForeignKey(
        "models_service.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reference = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The SFT policy the KL is measured against.",
    )
    training_run = models.ForeignKey(TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    decision = models.CharField(max_length=16, choices=Decision.choices, default=Decision.PENDING)
    decision_reason = models.TextField(blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    prompt_ids = models.JSONField(default=list, blank=True, help_text="The held-out prompt messages used.")
    metrics = models.JSONField(default=dict, blank=True)
    samples = models.JSONField(default=list, blank=True, help_text="Replies side by side, with their scores.")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["candidate"],
                condition=Q(status__in=["queued", "running"]),
                name="evaluation_one_active_per_candidate",
            ),
            models.CheckConstraint(condition=~Q(status="failed") | ~Q(error=""), name="evaluation_failure_has_error"),
        ]

    def __str__(self):
        return f"evaluation #{self.pk} of {self.candidate_id} ({self.status}, {self.decision})"
