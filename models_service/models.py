"""The model registry: every policy and reward model the loop has produced, and which ones serve."""

from pathlib import Path

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.db import models
from django.db.models import Q

from config import stages


class ModelVersion(models.Model):
    class Kind(models.TextChoices):
        POLICY = "policy", "Policy"
        REWARD = "reward", "Reward model"

    class Status(models.TextChoices):
        PENDING = "pending", "Being written"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        ARCHIVED = "archived", "Archived"

    name = models.CharField(max_length=128, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    stage = models.CharField(max_length=16, choices=stages.model_stage_choices)  # config/stages.py, or base
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
    manifest_sha256 = models.CharField(
        max_length=64,
        blank=True,
        help_text="SHA-256 of the artifact store's manifest as published: a host fetches only the files it names.",
    )
    metrics = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=False)
    activated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    notes = models.TextField(blank=True)
    load_error = models.TextField(blank=True, help_text="The last failure of a worker to load this version.")

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
            models.CheckConstraint(  # a folder under ARTIFACTS_DIR: relative, and no ".." step out of it
                condition=~Q(artifact_path="")
                & ~Q(artifact_path__startswith="/")
                & ~Q(artifact_path__regex=r"(^|/)\.\.(/|$)"),
                name="model_version_artifact_path_inside",
            ),
        ]
        ordering = ["-created_at"]

    def __str__(self):
        return self.name

    @property
    def artifact_dir(self) -> Path:
        """The version's folder, which must lie inside ARTIFACTS_DIR once links are followed: an artifact path
        edited to point elsewhere (a symlink out, say) is refused rather than loaded."""
        root = Path(settings.ARTIFACTS_DIR).resolve()
        path = (root / self.artifact_path).resolve()
        if path == root or not path.is_relative_to(root):
            raise SuspiciousFileOperation(
                f"{self.name}: its artifact path {self.artifact_path!r} leaves ARTIFACTS_DIR."
            )
        return path

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


class SamplingRequest(models.Model):
    """One context to sample candidate replies for, from claim to the messages and task it produced.

    A context can be claimed by one worker at a time (a partial unique index), so two sampling workers never
    fill the same context twice. Failures stay here with their error for the ops page.
    """

    class Purpose(models.TextChoices):
        POOL = "pool", "Ranking pool"
        CHAT = "chat", "Chat reply"
        ALTERNATIVES = "alternatives", "Alternatives asked for in chat"
        DRAFT = "draft", "Draft for a labeler's reply"

    class Status(models.TextChoices):
        PENDING = "pending", "Waiting for a worker"
        RUNNING = "running", "Sampling"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        PASSED_OVER = "passed_over", "Passed over: its candidates differed less than others of its batch"

    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    context = models.ForeignKey("labeling.Message", on_delete=models.CASCADE, related_name="sampling_requests")
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="sampling_requests"
    )
    k = models.PositiveSmallIntegerField(default=4)
    attempt = models.PositiveSmallIntegerField(
        default=1,
        help_text="Ranking pool: 1 for a context's first candidates from this policy; n > 1 for its re-sampling "
        "after n - 1 rankings that all tied (more candidates, a higher temperature).",
    )
    keep_message = models.ForeignKey(
        "labeling.Message",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="Alternatives: the model turn the labeler picked, ranked with the new samples.",
    )
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    reserve_for_requester = models.BooleanField(default=False)
    sampling_params = models.JSONField(default=dict, blank=True)
    task = models.ForeignKey(
        "labeling.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="sampling_requests"
    )
    reply = models.ForeignKey(
        "labeling.Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="Chat reply."
    )
    assignment = models.ForeignKey(
        "labeling.Assignment",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="draft_requests",
        help_text="Drafts: the labeler's task the model writes a reply for.",
    )
    partial_text = models.TextField(
        blank=True, help_text="Chat replies and drafts: the text generated so far, shown as it streams."
    )
    first_token_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["context", "purpose"],
                condition=Q(status__in=["pending", "running"]) & ~Q(purpose="draft"),
                name="sampling_request_one_in_flight_per_context",
            ),
            # Two labelers may ask for drafts of the same turn at once; one labeler has one draft in flight.
            models.UniqueConstraint(
                fields=["assignment"],
                condition=Q(status__in=["pending", "running"], purpose="draft"),
                name="sampling_request_one_draft_in_flight",
            ),
            models.CheckConstraint(
                condition=Q(purpose="draft", assignment__isnull=False)
                | (~Q(purpose="draft") & Q(assignment__isnull=True)),
                name="sampling_request_draft_has_assignment",
            ),
            models.CheckConstraint(condition=Q(k__gte=1) & Q(k__lte=9), name="sampling_request_k_range"),
            models.CheckConstraint(
                condition=~Q(status="failed") | ~Q(error=""), name="sampling_request_failure_has_error"
            ),
        ]
        indexes = [models.Index(fields=["purpose", "status"])]

    def __str__(self):
        return f"{self.get_purpose_display()} for message #{self.context_id} ({self.status})"

    @property
    def plain_error(self) -> str:
        """The failure as a labeler may read it: what happened in plain words, never an exception's name or a
        traceback's tail (`error` keeps those for the ops pages)."""
        if not self.error:
            return ""
        if "TimeLimit" in self.error or "No result after" in self.error:
            what = "The model took too long to answer."
        elif "No active" in self.error or "NoActiveModel" in self.error:
            what = "No model is serving right now."
        else:
            what = "The model could not answer because of a problem on the server."
        return f"{what} Try again; if it keeps happening, an admin can see the details on the ops pages."
