"""The labeling domain: conversation trees, the tasks labelers receive, their leases and what they submit.

Writes go through labeling/services/; these classes hold fields, constraints and small derived properties.
"""

import hashlib
import time

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.cache import cache
from django.db import models
from django.db.models import F, Q

from labeling import splits


class Role(models.TextChoices):
    SYSTEM = "system", "System"
    USER = "user", "User"
    ASSISTANT = "assistant", "Assistant"


# Which role may follow which in a conversation tree. None is the root.
ALLOWED_CHILD_ROLES = {
    None: {Role.SYSTEM, Role.USER},
    Role.SYSTEM: {Role.USER},
    Role.USER: {Role.ASSISTANT},
    Role.ASSISTANT: {Role.USER},
}


class ApiToken(models.Model):
    """A user's REST API token, kept as its SHA-256 only: the key is shown once, when it is made, and a copy of the
    database gives no one a way in. `prefix` (its first characters) tells tokens apart in admin."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_token")
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @staticmethod
    def digest_of(key: str) -> str:
        import hashlib

        return hashlib.sha256(key.encode()).hexdigest()


class LabelerProfile(models.Model):
    """What a labeler is good at (routing) and whether they may review."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="labeler_profile")
    languages = ArrayField(models.CharField(max_length=16), default=list, blank=True, help_text="e.g. en, de")
    topics = ArrayField(models.CharField(max_length=48), default=list, blank=True)
    is_reviewer = models.BooleanField(default=False, help_text="May review demonstrations.")
    accepted_guidelines_at = models.DateTimeField(null=True, blank=True)
    # The conversation of the labeler's last submission: the queue serves other conversations first (it spreads a
    # labeler's work), and this one only when nothing else of the drawn kind is free.
    last_conversation = models.ForeignKey(
        "labeling.Conversation", on_delete=models.SET_NULL, null=True, blank=True, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"profile of {self.user}"

    @property
    def pseudonym(self) -> str:
        """A stable pseudonymous id for exports: no name or e-mail leaves the product."""
        digest = hashlib.sha256(f"{settings.SECRET_KEY}:labeler:{self.user_id}".encode()).hexdigest()
        return f"labeler-{digest[:12]}"


class Conversation(models.Model):
    class Source(models.TextChoices):
        LABELER = "labeler", "Written by a labeler"
        CHAT = "chat", "Chat with the policy"
        IMPORT = "import", "Imported"

    source = models.CharField(max_length=16, choices=Source.choices, default=Source.LABELER)
    dataset = models.CharField(max_length=64, blank=True, help_text="Where imported data came from.")
    language = models.CharField(max_length=16, default="en")
    tags = ArrayField(models.CharField(max_length=48), default=list, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    content_hash = models.CharField(
        max_length=64, null=True, blank=True, unique=True, help_text="Makes imports idempotent."
    )
    metadata = models.JSONField(default=dict, blank=True)
    split = models.CharField(
        max_length=16,
        choices=splits.CHOICES,
        default=splits.random_split,
        help_text="Fixed at creation: train, validation, or held out for the evaluation gate.",
    )

    class Moderation(models.TextChoices):
        NONE = "", "Not reported"
        HIDDEN = "hidden", "Hidden: reported, waiting for an admin"
        KEPT = "kept", "Kept by an admin after reports"
        REMOVED = "removed", "Removed by an admin"

    moderation = models.CharField(
        max_length=8,
        choices=Moderation.choices,
        blank=True,
        default="",
        help_text="Reported conversations are hidden from everyone (no tasks, no training) until an admin decides.",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["source", "dataset"]), models.Index(fields=["split"])]

    def __str__(self):
        return f"conversation #{self.pk}"


class Message(models.Model):
    """A node of a conversation tree. Siblings (same parent) are alternatives for the same turn."""

    class Origin(models.TextChoices):
        HUMAN = "human", "Written by a labeler"
        MODEL = "model", "Sampled from a model"
        IMPORT = "import", "Imported"

    class ReviewStatus(models.TextChoices):
        NOT_REVIEWED = "", "Not a demonstration"
        PENDING = "pending", "Waiting for review"
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    depth = models.PositiveSmallIntegerField(default=0, editable=False)
    role = models.CharField(max_length=16, choices=Role.choices)
    text = models.TextField()
    origin = models.CharField(max_length=16, choices=Origin.choices)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="messages"
    )
    model_version = models.ForeignKey(
        "models_service.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="messages"
    )
    sampling_params = models.JSONField(null=True, blank=True)
    assignment = models.OneToOneField(
        "labeling.Assignment",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="written_message",
        help_text="The task assignment that produced this message, if any.",
    )
    review_status = models.CharField(max_length=16, choices=ReviewStatus.choices, blank=True, default="")
    draft_model_version = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="drafted_messages",
        help_text="A labeler's text that started from a model draft: the policy version that wrote the draft.",
    )
    draft_edit_ratio = models.FloatField(
        null=True,
        blank=True,
        help_text="How much the labeler changed the model draft: 0 = submitted as drafted, 1 = nothing kept.",
    )
    revision = models.PositiveIntegerField(
        default=1, editable=False, help_text="Counts the text's edits; a review judges one revision."
    )
    used_in_training_at = models.DateTimeField(
        null=True, blank=True, help_text="Set when a training run first used this message; it is frozen after."
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # The composite foreign key (parent_id, conversation_id) -> (id, conversation_id), which keeps a
            # parent in the same conversation, is created in migration 0002 (Django has no composite FKs).
            models.UniqueConstraint(fields=["id", "conversation"], name="message_id_conversation_unique"),
            models.UniqueConstraint(
                fields=["conversation"], condition=Q(parent__isnull=True), name="message_one_root_per_conversation"
            ),
            models.CheckConstraint(
                condition=(Q(parent__isnull=True) & Q(depth=0)) | (Q(parent__isnull=False) & Q(depth__gt=0)),
                name="message_depth_matches_parent",
            ),
            models.CheckConstraint(
                condition=~Q(origin="model")
                | (Q(model_version__isnull=False) & Q(sampling_params__isnull=False) & Q(author__isnull=True)),
                name="message_model_origin_has_version_and_params",
            ),
            models.CheckConstraint(
                condition=~Q(origin="human") | (Q(author__isnull=False) & Q(model_version__isnull=True)),
                name="message_human_origin_has_author",
            ),
            models.CheckConstraint(
                condition=~Q(origin="import") | (Q(author__isnull=True) & Q(model_version__isnull=True)),
                name="message_import_origin_has_no_author",
            ),
            models.CheckConstraint(
                condition=Q(review_status="") | (Q(role="assistant") & ~Q(origin="model")),
                name="message_only_written_replies_are_reviewed",
            ),
            # Imported data and model samples may hold an empty reply (HH-RLHF prefers silence in a few
            # pairs; a policy can stop at once); what a person writes never is.
            models.CheckConstraint(
                condition=~Q(text="") | Q(origin__in=["import", "model"]), name="message_written_text_not_empty"
            ),
            models.CheckConstraint(
                condition=(Q(draft_model_version__isnull=True) & Q(draft_edit_ratio__isnull=True))
                | (
                    Q(origin="human")
                    & Q(draft_model_version__isnull=False)
                    & Q(draft_edit_ratio__gte=0)
                    & Q(draft_edit_ratio__lte=1)
                ),
                name="message_draft_figures_on_written_text",
            ),
        ]
        indexes = [
            models.Index(fields=["conversation", "depth"]),
            models.Index(fields=["review_status"], condition=~Q(review_status=""), name="message_demonstrations"),
        ]

    def __str__(self):
        return f"{self.role} message #{self.pk}"

    @property
    def is_demonstration(self) -> bool:
        return self.role == Role.ASSISTANT and self.origin != self.Origin.MODEL

    @property
    def preview(self) -> str:
        return self.text if len(self.text) <= 80 else self.text[:77] + "..."


class TaskKind(models.TextChoices):
    WRITE_PROMPT = "write_prompt", "Write a prompt"
    WRITE_ASSISTANT_REPLY = "write_assistant_reply", "Write the assistant reply"
    WRITE_USER_REPLY = "write_user_reply", "Write the user reply"
    RANK_REPLIES = "rank_replies", "Rank candidate replies"
    REVIEW_DEMONSTRATION = "review_demonstration", "Review a demonstration"


# Task's foreign keys that are usually NULL, indexed only where set (see Task.Meta.indexes).
PARTIALLY_INDEXED_TASK_KEYS = ("target_message", "model_version", "reserved_for", "created_by")


class Task(models.Model):
    """A unit of work handed to labelers. `overlap` labelers each submit it once."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"

    kind = models.CharField(max_length=32, choices=TaskKind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    priority = models.IntegerField(default=0, help_text="Higher is served first.")
    overlap = models.PositiveSmallIntegerField(default=1, help_text="How many labelers must submit it.")
    submitted_count = models.PositiveSmallIntegerField(default=0, editable=False)
    free_slots_from = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When every slot is taken: the earliest time one may free up (a lease expiring). Lets the "
        "queue skip busy tasks cheaply; the authoritative slot count is taken under the task's row lock.",
    )
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.CASCADE, related_name="tasks"
    )
    parent_message = models.ForeignKey(
        Message,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="tasks_as_context",
        help_text="The message to reply to, or whose candidate replies are ranked.",
    )
    target_message = models.ForeignKey(
        Message,
        null=True,
        db_index=False,  # a partial index below
        blank=True,
        on_delete=models.CASCADE,
        related_name="tasks_as_target",
        help_text="The demonstration under review.",
    )
    candidates = models.ManyToManyField(Message, through="TaskCandidate", related_name="candidate_in_tasks")
    model_version = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        db_index=False,  # a partial index below
        blank=True,
        on_delete=models.PROTECT,
        related_name="tasks",
        help_text="The policy that sampled the candidates.",
    )
    language = models.CharField(max_length=16, default="en")
    tags = ArrayField(models.CharField(max_length=48), default=list, blank=True)
    reserved_for = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        db_index=False,  # a partial index below
        blank=True,
        on_delete=models.CASCADE,
        related_name="reserved_tasks",
        help_text="Only this labeler is offered the task (e.g. alternatives they asked for in chat).",
    )
    payload = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        db_index=False,  # a partial index below
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    cancelled_reason = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(overlap__gte=1) & Q(overlap__lte=20), name="task_overlap_range"),
            models.CheckConstraint(condition=Q(submitted_count__lte=F("overlap")), name="task_submitted_le_overlap"),
            models.CheckConstraint(
                condition=~Q(status="done") | Q(submitted_count=F("overlap")), name="task_done_means_all_submitted"
            ),
            models.CheckConstraint(
                condition=~Q(kind="write_prompt") | (Q(conversation__isnull=True) & Q(parent_message__isnull=True)),
                name="task_write_prompt_starts_fresh",
            ),
            models.CheckConstraint(
                condition=~Q(kind__in=["write_assistant_reply", "write_user_reply", "rank_replies"])
                | (Q(conversation__isnull=False) & Q(parent_message__isnull=False)),
                name="task_reply_and_rank_have_context",
            ),
            models.CheckConstraint(
                condition=~Q(kind="review_demonstration")
                | (Q(conversation__isnull=False) & Q(target_message__isnull=False)),
                name="task_review_has_target",
            ),
        ]
        indexes = [
            # The queue's scans (labeling_lease_next): open tasks that may have a free slot, best first, without
            # walking past the tasks whose slots are all leased; and the busy ones by the time they may free up.
            models.Index(
                fields=["kind", "-priority", "created_at", "id"],
                condition=Q(status="open", free_slots_from__isnull=True),
                name="task_open_free_queue_order",
            ),
            models.Index(
                fields=["free_slots_from"],
                condition=Q(status="open", free_slots_from__isnull=False),
                name="task_open_busy_until",
            ),
            models.Index(fields=["kind", "status"]),
            # Foreign keys that most tasks leave empty: only the rows that have one are indexed (what deleting the
            # row they point to looks up). Every lease that takes a task's last slot updates the task, and a full
            # index of each of them took a duplicate NULL entry at each such update.
            *(
                models.Index(fields=[name], condition=Q(**{f"{name}__isnull": False}), name=f"task_{name}")
                for name in PARTIALLY_INDEXED_TASK_KEYS
            ),
        ]

    def __str__(self):
        return f"{self.get_kind_display()} #{self.pk}"

    @property
    def remaining(self) -> int:
        return max(self.overlap - self.submitted_count, 0)


class TaskCandidate(models.Model):
    """A candidate reply of a ranking task, in the order it is first shown."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="task_candidates")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(fields=["task", "message"], name="task_candidate_unique_message"),
            models.UniqueConstraint(fields=["task", "position"], name="task_candidate_unique_position"),
        ]

    def __str__(self):
        return f"candidate {self.position + 1} of task #{self.task_id}"


class Assignment(models.Model):
    """A labeler's slot in a task: the lease they hold on it and what became of it."""

    class Status(models.TextChoices):
        LEASED = "leased", "Leased"
        SUBMITTED = "submitted", "Submitted"
        SKIPPED = "skipped", "Skipped"
        REPORTED = "reported", "Reported"
        EXPIRED = "expired", "Lease expired"

    class ReportReason(models.TextChoices):
        SPAM = "spam", "Spam"
        HARMFUL = "harmful", "Harmful content"
        PERSONAL_DATA = "personal_data", "Personal data"
        OTHER = "other", "Other"

    # No index of their own: the unique (task, labeler) and the (labeler, status) indexes lead with them, and every
    # lease wrote the two extra indexes for nothing.
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="assignments", db_index=False)
    labeler = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments", db_index=False
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.LEASED)
    leased_at = models.DateTimeField(auto_now_add=True)
    lease_expires_at = models.DateTimeField()
    submitted_at = models.DateTimeField(null=True, blank=True)
    skip_reason = models.TextField(blank=True)
    report_reason = models.CharField(max_length=16, choices=ReportReason.choices, blank=True)
    draft = models.TextField(blank=True, help_text="What the labeler typed so far; kept across expired leases.")
    model_draft = models.TextField(
        blank=True,
        default="",
        db_default="",  # the queue's PL/pgSQL inserts assignments without naming it
        help_text="The last reply the model drafted for this task at the labeler's request (write tasks).",
    )
    model_draft_version = models.ForeignKey(
        "models_service.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The policy version that wrote the model draft.",
    )
    model_drafts = models.JSONField(
        default=list,
        db_default=[],  # the queue's PL/pgSQL inserts assignments without naming it
        blank=True,
        help_text="Every reply the model drafted for this task ({text, model_version}), the last one last.",
    )
    time_spent_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "labeler"], name="assignment_one_per_labeler_and_task"),
            models.CheckConstraint(
                condition=~Q(status="submitted") | Q(submitted_at__isnull=False),
                name="assignment_submitted_has_time",
            ),
            models.CheckConstraint(
                condition=~Q(status="reported") | ~Q(report_reason=""), name="assignment_report_has_reason"
            ),
        ]
        indexes = [
            models.Index(fields=["labeler", "status"]),
            models.Index(fields=["lease_expires_at"], condition=Q(status="leased"), name="assignment_live_leases"),
            models.Index(fields=["labeler", "-leased_at"], condition=Q(status="leased"), name="assignment_leased_by"),
        ]

    def __str__(self):
        return f"{self.labeler} on task #{self.task_id} ({self.status})"


class CandidateFlag(models.TextChoices):
    """Per-candidate metadata labelers record, as in InstructGPT's labeling interface."""

    FAILS_INSTRUCTION = "fails_instruction", "Fails to follow the instruction"
    FAILS_CONSTRAINT = "fails_constraint", "Ignores a constraint in the instruction"
    HALLUCINATION = "hallucination", "Makes up facts (hallucination)"
    HARMFUL = "harmful", "Harmful or inappropriate"
    INAPPROPRIATE_FOR_ASSISTANT = "inappropriate_for_assistant", "Inappropriate for a customer assistant"
    SEXUAL = "sexual", "Sexual content"
    VIOLENT = "violent", "Violent content"
    DENIGRATES = "denigrates", "Denigrates a protected class"
    HARMFUL_ADVICE = "harmful_advice", "Gives harmful advice"
    OPINION = "opinion", "Expresses an opinion"
    MORAL_JUDGMENT = "moral_judgment", "Expresses a moral judgment"


class Ranking(models.Model):
    """One labeler's order of a task's candidates. Equal ranks are ties; rank 1 is best."""

    assignment = models.OneToOneField(Assignment, on_delete=models.CASCADE, related_name="ranking")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="rankings")
    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="rankings")
    all_unacceptable = models.BooleanField(default=False)
    quality_rating = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Overall quality, 1-7.")
    order_untouched = models.BooleanField(default=False, help_text="Submitted in the order shown, after the warning.")
    time_spent_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    used_in_training_at = models.DateTimeField(null=True, blank=True)
    improvement = models.OneToOneField(
        Message,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="improvement_of",
        help_text="The labeler's own better reply, written when no candidate was good enough: a demonstration "
        "(reviewed like any) and, once accepted, preferred over every candidate of this ranking.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "labeler"], name="ranking_one_per_labeler_and_task"),
            models.CheckConstraint(
                condition=Q(quality_rating__isnull=True) | (Q(quality_rating__gte=1) & Q(quality_rating__lte=7)),
                name="ranking_quality_rating_1_to_7",
            ),
        ]

    def __str__(self):
        return f"ranking #{self.pk} of task #{self.task_id}"

    @property
    def improvement_counts(self) -> bool:
        """Whether the labeler's improvement is a preference: written, and accepted by review."""
        return self.improvement is not None and self.improvement.review_status == Message.ReviewStatus.ACCEPTED

    @property
    def ordered_message_ids(self) -> list[list[int]]:
        """Candidate ids grouped by rank, best first; a group of more than one is a tie."""
        groups: dict[int, list[int]] = {}
        for entry in sorted(self.entries.all(), key=lambda e: (e.rank, e.message_id)):
            groups.setdefault(entry.rank, []).append(entry.message_id)
        return [groups[rank] for rank in sorted(groups)]


class RankingEntry(models.Model):
    ranking = models.ForeignKey(Ranking, on_delete=models.CASCADE, related_name="entries")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="ranking_entries")
    rank = models.PositiveSmallIntegerField(help_text="1 is best. Candidates with the same rank are tied.")
    flags = ArrayField(models.CharField(max_length=32, choices=CandidateFlag.choices), default=list, blank=True)
    rm_score = models.FloatField(null=True, blank=True, help_text="The active reward model's score of this reply.")
    rm_version = models.ForeignKey(
        "models_service.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["rank", "message_id"]
        constraints = [
            models.UniqueConstraint(fields=["ranking", "message"], name="ranking_entry_unique_message"),
            models.CheckConstraint(condition=Q(rank__gte=1) & Q(rank__lte=9), name="ranking_entry_rank_range"),
        ]

    def __str__(self):
        return f"rank {self.rank} in ranking #{self.ranking_id}: message #{self.message_id}"


class Review(models.Model):
    """A reviewer's verdict on a demonstration. Accepted demonstrations become SFT data."""

    class Decision(models.TextChoices):
        ACCEPT = "accept", "Accept"
        REJECT = "reject", "Reject"

    assignment = models.OneToOneField(Assignment, on_delete=models.CASCADE, related_name="review")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews")
    revision = models.PositiveIntegerField(default=1, help_text="The revision of the message's text it judged.")
    decision = models.CharField(max_length=8, choices=Decision.choices)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["message", "revision", "reviewer"], name="review_one_per_reviewer_and_revision"
            ),
            models.CheckConstraint(condition=~Q(decision="reject") | ~Q(reason=""), name="review_reject_has_reason"),
        ]

    def __str__(self):
        return f"{self.decision} of message #{self.message_id}"


class MessageRevision(models.Model):
    """An earlier text of a message, kept when its author edited it in place (nothing but reviews depended on
    it): a review of revision n judged `text` here, or the message's own text when n is its current revision."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="revisions")
    revision = models.PositiveIntegerField()
    text = models.TextField()
    replaced_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "revision"], name="message_revision_once")]

    def __str__(self):
        return f"message #{self.message_id}, revision {self.revision}"


class ConversationExclusion(models.Model):
    """A conversation the queue no longer gives one labeler: they skipped it as content they would rather not work
    on, or reported it. Every branch and every task on it, ranking tasks included."""

    labeler = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="exclusions")
    reason = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["labeler", "conversation"], name="conversation_exclusion_once"),
        ]

    def __str__(self):
        return f"conversation #{self.conversation_id} kept from user #{self.labeler_id}"


class QueueSettings(models.Model):
    """How the queue mixes task kinds, overlaps, leases and routing. One row, edited in admin."""

    lease_minutes = models.PositiveSmallIntegerField(default=30, help_text="How long a labeler holds a task.")
    weight_write_prompt = models.FloatField(default=1.0)
    weight_write_assistant_reply = models.FloatField(default=3.0)
    weight_write_user_reply = models.FloatField(default=1.0)
    weight_rank_replies = models.FloatField(default=5.0)
    weight_review_demonstration = models.FloatField(default=3.0)
    rank_overlap = models.PositiveSmallIntegerField(
        default=2, help_text="Labelers per ranking task, for the fraction below (the rest get one)."
    )
    rank_overlap_fraction = models.FloatField(
        default=0.2, help_text="Share of ranking tasks done by several labelers, to measure agreement."
    )
    review_overlap = models.PositiveSmallIntegerField(default=1, help_text="Reviewers per demonstration.")
    open_prompt_tasks = models.PositiveSmallIntegerField(
        default=5, help_text="How many 'write a prompt' tasks are kept open."
    )
    max_conversation_turns = models.PositiveSmallIntegerField(
        default=6, help_text="No 'write the user reply' task beyond this many messages."
    )
    reports_to_cancel = models.PositiveSmallIntegerField(
        default=2, help_text="A task reported this many times leaves the queue for an admin to look at."
    )
    language_bonus_minutes = models.PositiveSmallIntegerField(
        default=120, help_text="A task in one of the labeler's languages counts as this many minutes older."
    )
    topic_bonus_minutes = models.PositiveSmallIntegerField(
        default=60, help_text="A task on one of the labeler's topics counts as this many minutes older."
    )
    max_age_minutes = models.PositiveIntegerField(
        default=24 * 60, help_text="Waiting time stops adding priority after this long."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "queue settings"
        verbose_name_plural = "queue settings"
        constraints = [
            models.CheckConstraint(condition=Q(id=1), name="queue_settings_singleton"),
            models.CheckConstraint(
                condition=Q(rank_overlap_fraction__gte=0) & Q(rank_overlap_fraction__lte=1),
                name="queue_settings_fraction_range",
            ),
            models.CheckConstraint(condition=Q(lease_minutes__gte=1), name="queue_settings_lease_positive"),
            models.CheckConstraint(
                condition=Q(rank_overlap__gte=1) & Q(rank_overlap__lte=20), name="queue_settings_rank_overlap_range"
            ),
            models.CheckConstraint(
                condition=Q(review_overlap__gte=1) & Q(review_overlap__lte=20),
                name="queue_settings_review_overlap_range",
            ),
            models.CheckConstraint(
                condition=Q(weight_write_prompt__gte=0)
                & Q(weight_write_assistant_reply__gte=0)
                & Q(weight_write_user_reply__gte=0)
                & Q(weight_rank_replies__gte=0)
                & Q(weight_review_demonstration__gte=0),
                name="queue_settings_weights_non_negative",
            ),
        ]

    CACHE_KEY = "labeling:queue-settings"
    LOCAL_TTL_S = 10
    _local: "tuple[QueueSettings, float] | None" = None

    def __str__(self):
        return "Queue settings"

    def save(self, *args, **kwargs):
        self.pk = 1
        super().save(*args, **kwargs)
        cache.delete(self.CACHE_KEY)
        QueueSettings._local = None

    @classmethod
    def load(cls) -> "QueueSettings":
        """The settings, from this process's memory for up to LOCAL_TTL_S, else from Redis, else the database.

        A change in admin reaches every process within LOCAL_TTL_S seconds.
        """
        now = time.monotonic()
        if cls._local is not None and now < cls._local[1]:
            return cls._local[0]
        cached = cache.get(cls.CACHE_KEY)
        if cached is None:
            cached, _ = cls.objects.get_or_create(pk=1)
            cache.set(cls.CACHE_KEY, cached, 300)
        cls._local = (cached, now + cls.LOCAL_TTL_S)
        return cached

    @property
    def kind_weights(self) -> dict[str, float]:
        return {kind: getattr(self, f"weight_{kind}") for kind in TaskKind.values}


class ImportJob(models.Model):
    """A JSONL file uploaded for import, processed by a worker, with its progress and the lines it refused."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Importing"
        DONE = "done", "Done"
        ABORTED = "aborted", "Aborted: malformed lines"
        FAILED = "failed", "Failed"

    class OnError(models.TextChoices):
        SKIP = "skip", "Skip malformed lines"
        ABORT = "abort", "Abort the whole import"

    file_path = models.CharField(
        max_length=512, blank=True, help_text="A file on the worker's disk (demo data); uploads are ImportChunks."
    )
    original_name = models.CharField(max_length=255)
    format = models.CharField(max_length=32, default="auto")
    dataset = models.CharField(max_length=64, blank=True)
    on_error = models.CharField(max_length=8, choices=OnError.choices, default=OnError.SKIP)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    size_bytes = models.BigIntegerField(default=0)
    lines_done = models.PositiveIntegerField(default=0)
    lines_total = models.PositiveIntegerField(default=0)
    added = models.PositiveIntegerField(default=0)
    existing = models.PositiveIntegerField(default=0)
    errors = models.JSONField(default=list, blank=True, help_text="[line number, reason] of refused lines.")
    error_count = models.PositiveIntegerField(default=0)
    failure = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life from the worker importing it (reaped when it stops)."
    )
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Workers that started it.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"import #{self.pk} of {self.original_name} ({self.status})"

    @property
    def fraction(self) -> float:
        return self.lines_done / self.lines_total if self.lines_total else 0.0


class ImportChunk(models.Model):
    """A piece of an uploaded import file, kept in the database so that a worker on any host can read it (the web
    host's disk is its own); deleted once the import has run."""

    job = models.ForeignKey(ImportJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    data = models.BinaryField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="import_chunk_once")]
        ordering = ["job", "index"]
