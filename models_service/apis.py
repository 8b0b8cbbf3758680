"""Model versions, read-only: any signed-in user may see which policy serves and where it came from."""

from rest_framework import serializers
from rest_framework.generics import ListAPIView, RetrieveAPIView

from models_service.models import ModelVersion


class ModelVersionOut(serializers.ModelSerializer):
    parent = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "name",
            "kind",
            "stage",
            "status",
            "is_active",
            "activated_at",
            "parent",
            "training_run",
            "source",
            "metrics",
            "created_at",
        ]


class ModelVersionListApi(ListAPIView):
    serializer_class = ModelVersionOut
    queryset = ModelVersion.objects.select_related("parent").order_by("-created_at", "-pk")


class ModelVersionDetailApi(RetrieveAPIView):
    serializer_class = ModelVersionOut
    queryset = ModelVersion.objects.select_related("parent")
    lookup_url_kwarg = "version_id"
