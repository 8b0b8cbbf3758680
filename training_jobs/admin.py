from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from training_jobs import selectors, services
from training_jobs.models import Evaluation, LoopSettings, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    """Runs to browse. Starting one is the ops pages' (Runs → Start a run): one console, one set of words."""

    actions = ["cancel_runs"]
    list_display = ["id", "kind", "status", "started_by", "progress", "base_model", "created_at", "duration"]
    list_filter = ["kind", "status", "trigger", "created_at"]
    search_fields = ["id", "error", "log_tail", "celery_task_id"]
    raw_id_fields = ["triggered_by", "previous_run", "base_model", "reward_model"]
    readonly_fields = [
        "progress",
        "duration",
        "progress_step",
        "progress_total",
        "metrics",
        "summary",
        "data_snapshot",
        "library_versions",
        "log_tail",
        "error",
        "celery_task_id",
        "worker",
        "heartbeat_at",
        "created_at",
        "started_at",
        "finished_at",
    ]

    # A run's record is history: its kind, status, inputs and results change only through the services (the ops
    # pages, cancel, the worker), never by hand. A run added by hand could claim to be
    # running and block every retrain; so admin views runs and neither adds nor edits them.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="progress")
    def progress(self, obj):
        return f"{obj.progress_step} / {obj.progress_total} ({obj.progress_fraction:.0%})"

    @admin.display(description="duration")
    def duration(self, obj):
        return "-" if obj.duration_s is None else f"{obj.duration_s:.0f} s"

    @admin.action(description="Cancel the selected runs")
    def cancel_runs(self, request, queryset):
        cancelled, stopping = [], []
        for run in queryset:
            try:
                run = services.training_run_cancel(run=run, actor=request.user)
            except ValidationError as error:
                self.message_user(request, " ".join(error.messages), level=messages.WARNING)
                continue
            (cancelled if run.status == TrainingRun.Status.CANCELLED else stopping).append(f"#{run.pk}")
        again = selectors.cancel_consequence_sentence()
        if cancelled:
            self.message_user(request, f"Cancelled run {', '.join(cancelled)}.{again}")
        if stopping:
            self.message_user(request, f"Run {', '.join(stopping)} stops at its next step.{again}")

    @admin.display(description="trigger")
    def started_by(self, obj):
        return obj.started_by


@admin.register(LoopSettings)
class LoopSettingsAdmin(admin.ModelAdmin):
    """The retraining policy and the promotion rules (one row)."""

    list_display = ["__str__", "enabled", "sft_threshold", "rm_threshold", "policy_path", "auto_promote", "updated_at"]
    readonly_fields = ["last_checked_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["enabled", "check_every_minutes", "last_checked_at"]}),
        ("When to retrain", {"fields": ["sft_threshold", "rm_threshold", "ppo_after_new_models", "policy_path"]}),
        ("Evaluation", {"fields": ["eval_prompts", "eval_max_new_tokens", "human_comparisons", "votes_per_labeler"]}),
        (
            "Promotion rules",
            {
                "fields": [
                    "auto_promote",
                    "min_rm_gain",
                    "min_rm_accuracy",
                    "max_kl",
                    "refuse_length_only_gain",
                    "require_human_win_rate",
                    "min_human_comparisons",
                    "min_human_win_rate",
                ]
            },
        ),
        ("Pause", {"fields": ["paused_reason", "paused_for", "updated_at"]}),
    ]

    def has_add_permission(self, request):
        return not LoopSettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def get_object(self, request, object_id, from_field=None):
        LoopSettings.load()
        return super().get_object(request, object_id, from_field)


@admin.register(Evaluation)
class EvaluationAdmin(admin.ModelAdmin):
    list_display = ["id", "candidate", "baseline", "status", "decision", "rm_gain", "created_at"]
    list_filter = ["status", "decision", "created_at"]
    search_fields = ["candidate__name", "baseline__name", "decision_reason", "error"]
    raw_id_fields = ["candidate", "baseline", "reward_model", "reference", "training_run", "decided_by"]
    readonly_fields = ["rm_gain", "metrics", "samples", "prompt_ids", "created_at", "finished_at", "decided_at"]

    @admin.display(description="score gain")
    def rm_gain(self, obj):
        gain = obj.metrics.get("rm_gain")
        return "-" if gain is None else f"{gain:+.3f}"
