from django.contrib import admin

from models_service.models import ModelActivation, ModelVersion


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "stage", "status", "is_active", "parent", "training_run", "created_at"]
    list_filter = ["kind", "stage", "status", "is_active"]
    search_fields = ["name", "source", "artifact_path", "notes"]
    raw_id_fields = ["parent", "training_run"]
    readonly_fields = ["is_active", "activated_at", "created_at", "lineage_display", "artifact_dir"]

    @admin.display(description="lineage")
    def lineage_display(self, obj):
        return " → ".join(f"{v.name} ({v.stage})" for v in obj.lineage) if obj.pk else "-"


@admin.register(ModelActivation)
class ModelActivationAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "action", "model_version", "previous", "actor", "automatic", "reason"]
    list_filter = ["kind", "action", "automatic", "created_at"]
    search_fields = ["model_version__name", "reason", "actor__username"]
    readonly_fields = [f.name for f in ModelActivation._meta.fields]

    def has_add_permission(self, request):
        return False
