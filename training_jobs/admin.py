from django.contrib import admin

from training_jobs.models import TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "trigger", "progress", "base_model", "created_at", "duration"]
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

    @admin.display(description="progress")
    def progress(self, obj):
        return f"{obj.progress_step} / {obj.progress_total} ({obj.progress_fraction:.0%})"

    @admin.display(description="duration")
    def duration(self, obj):
        return "-" if obj.duration_s is None else f"{obj.duration_s:.0f} s"
