from django.contrib import admin
from django.db.models import Count
from django.utils.html import format_html, format_html_join

from labeling.models import (
    ApiToken,
    Assignment,
    Conversation,
    LabelerProfile,
    Message,
    QueueSettings,
    Ranking,
    RankingEntry,
    Review,
    Task,
    TaskCandidate,
)


@admin.register(LabelerProfile)
class LabelerProfileAdmin(admin.ModelAdmin):
    list_display = ["user", "is_reviewer", "languages", "topics", "pseudonym", "created_at"]
    list_filter = ["is_reviewer"]
    search_fields = ["user__username", "user__email"]
    readonly_fields = ["pseudonym", "created_at"]


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ["id", "parent", "depth", "role", "origin", "preview", "review_status"]
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["id", "source", "dataset", "language", "tags", "message_count", "created_at"]
    list_filter = ["source", "dataset", "language", "created_at"]
    search_fields = ["id", "messages__text", "tags"]
    readonly_fields = ["content_hash", "created_at", "message_count"]
    inlines = [MessageInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_message_count=Count("messages"))

    @admin.display(ordering="_message_count", description="messages")
    def message_count(self, obj):
        return obj._message_count


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "conversation", "depth", "role", "origin", "preview", "review_status", "model_version"]
    list_filter = ["role", "origin", "review_status", "model_version", "created_at"]
    search_fields = ["text", "conversation__id", "author__username"]
    raw_id_fields = ["conversation", "parent", "author", "assignment"]
    readonly_fields = ["depth", "sibling_count", "created_at", "updated_at", "used_in_training_at"]
    list_select_related = ["model_version"]

    # A record to read: a message's text and provenance change only through the services (a labeler's edit makes a
    # revision; a reply, once trained on, never changes), never in place here where the old text would be lost.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="alternatives for this turn")
    def sibling_count(self, obj):
        if obj.pk is None:
            return "-"
        return Message.objects.filter(conversation_id=obj.conversation_id, parent_id=obj.parent_id).count()


class TaskCandidateInline(admin.TabularInline):
    model = TaskCandidate
    extra = 0
    fields = ["position", "message", "reply", "written_by"]
    readonly_fields = ["reply", "written_by"]
    raw_id_fields = ["message"]

    @admin.display(description="reply")
    def reply(self, obj):
        return obj.message.text if obj.message_id else "-"

    @admin.display(description="written by")
    def written_by(self, obj):
        if not obj.message_id:
            return "-"
        message = obj.message
        return (
            message.model_version.name if message.model_version_id else (message.author or message.get_origin_display())
        )


class AssignmentInline(admin.TabularInline):
    model = Assignment
    extra = 0
    fields = ["labeler", "status", "leased_at", "lease_expires_at", "submitted_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "priority", "progress", "language", "model_version", "created_at"]
    list_filter = ["kind", "status", "language", "model_version", "created_at"]
    search_fields = ["id", "tags", "parent_message__text"]
    raw_id_fields = ["conversation", "parent_message", "target_message", "created_by"]
    readonly_fields = ["conversation_so_far", "submitted_count", "progress", "created_at", "completed_at"]
    inlines = [TaskCandidateInline, AssignmentInline]

    @admin.display(description="conversation so far")
    def conversation_so_far(self, obj):
        """The turns the task answers (or reviews), oldest first, as the labeler sees them."""
        from labeling.selectors import message_thread

        last = obj.parent_message or (obj.target_message if obj.target_message_id else None)
        if last is None:
            return "- (a new conversation)"
        turns = message_thread(last)
        return format_html_join(
            "",
            '<p style="margin:0 0 6px"><strong>{}</strong>: {}</p>',
            ((m.get_role_display(), m.text) for m in turns),
        )

    @admin.display(description="submitted / overlap")
    def progress(self, obj):
        return f"{obj.submitted_count} / {obj.overlap}"


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "task", "labeler", "status", "leased_at", "lease_expires_at", "lease_state", "submitted_at"]
    list_filter = ["status", "task__kind", "report_reason", "leased_at"]
    search_fields = ["labeler__username", "task__id", "skip_reason"]
    raw_id_fields = ["task", "labeler"]
    readonly_fields = ["leased_at", "lease_state"]

    @admin.display(description="lease")
    def lease_state(self, obj):
        from django.utils import timezone

        if obj.status != Assignment.Status.LEASED:
            return "-"
        if obj.lease_expires_at <= timezone.now():
            return format_html('<span style="color:#b00">expired</span>')
        return "held"


class RankingEntryInline(admin.TabularInline):
    model = RankingEntry
    extra = 0
    raw_id_fields = ["message"]


@admin.register(Ranking)
class RankingAdmin(admin.ModelAdmin):
    list_display = ["id", "task", "labeler", "order_display", "quality_rating", "all_unacceptable", "created_at"]
    list_filter = ["all_unacceptable", "quality_rating", "order_untouched", "created_at"]
    search_fields = ["labeler__username", "task__id"]
    raw_id_fields = ["assignment", "task", "labeler"]
    readonly_fields = ["order_display", "created_at", "updated_at", "used_in_training_at"]
    inlines = [RankingEntryInline]

    @admin.display(description="order (best first, = for ties)")
    def order_display(self, obj):
        return " > ".join(" = ".join(f"#{i}" for i in group) for group in obj.ordered_message_ids)


@admin.register(Review)
class ReviewAdmin(admin.ModelAdmin):
    list_display = ["id", "message", "reviewer", "decision", "reason", "created_at"]
    list_filter = ["decision", "created_at"]
    search_fields = ["reviewer__username", "reason", "message__text"]
    raw_id_fields = ["assignment", "message", "reviewer"]
    readonly_fields = ["created_at"]


@admin.register(QueueSettings)
class QueueSettingsAdmin(admin.ModelAdmin):
    """One row: the mix of task kinds, overlaps, leases and routing bonuses."""

    list_display = ["__str__", "lease_minutes", "rank_overlap", "rank_overlap_fraction", "review_overlap", "updated_at"]
    readonly_fields = ["updated_at", "kind_mix"]
    fieldsets = [
        ("Leases", {"fields": ["lease_minutes"]}),
        (
            "Mix of task kinds (relative weights)",
            {
                "fields": [
                    "weight_write_prompt",
                    "weight_write_assistant_reply",
                    "weight_write_user_reply",
                    "weight_rank_replies",
                    "weight_review_demonstration",
                    "kind_mix",
                ]
            },
        ),
        ("Overlap", {"fields": ["rank_overlap", "rank_overlap_fraction", "review_overlap"]}),
        ("Supply", {"fields": ["open_prompt_tasks", "max_conversation_turns", "reports_to_cancel"]}),
        ("Routing", {"fields": ["language_bonus_minutes", "topic_bonus_minutes", "max_age_minutes"]}),
        (None, {"fields": ["updated_at"]}),
    ]

    @admin.display(description="share of tasks offered, when every kind has work")
    def kind_mix(self, obj):
        weights = obj.kind_weights
        total = sum(weights.values()) or 1
        return ", ".join(f"{kind.replace('_', ' ')} {w / total:.0%}" for kind, w in weights.items())

    def has_add_permission(self, request):
        return not QueueSettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Which users have a token and since when; the key itself is kept nowhere (its owner saw it once)."""

    list_display = ["user", "prefix", "created"]
    search_fields = ["user__username"]
    readonly_fields = ["user", "prefix", "created"]
    exclude = ["digest"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


# DRF's own token admin would list plain keys of the tokens this product no longer makes.
try:
    from rest_framework.authtoken.models import TokenProxy

    admin.site.unregister(TokenProxy)
except (ImportError, admin.sites.NotRegistered):
    pass
