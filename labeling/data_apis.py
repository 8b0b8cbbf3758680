"""The labeling API for admins: imports of JSONL files and exports of the data set (with its card)."""

import datetime as dt

from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import RetrieveAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api import ImportMultiPartParser, IsAdmin
from labeling import exporting, services
from labeling.importing import FORMATS
from labeling.models import ImportJob
from labeling.selectors import import_job_live


class ImportJobOut(serializers.ModelSerializer):
    class Meta:
        model = ImportJob
        fields = [
            "id",
            "original_name",
            "format",
            "dataset",
            "on_error",
            "status",
            "size_bytes",
            "lines_done",
            "lines_total",
            "added",
            "existing",
            "error_count",
            "errors",
            "failure",
            "created_at",
            "finished_at",
        ]


class ImportCreateApi(APIView):
    permission_classes = [IsAdmin]
    parser_classes = [ImportMultiPartParser]

    class ImportInput(serializers.Serializer):
        file = serializers.FileField()
        format = serializers.ChoiceField(choices=["auto", *FORMATS], default="auto")
        on_error = serializers.ChoiceField(choices=ImportJob.OnError.values, default="skip")
        dataset = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")

    @extend_schema(
        request={"multipart/form-data": ImportInput}, responses={202: ImportJobOut}, summary="Import a JSONL file"
    )
    def post(self, request):
        serializer = self.ImportInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        job = services.import_job_create(
            upload=data["file"],
            format=data["format"],
            on_error=data["on_error"],
            dataset=data["dataset"],
            user=request.user,
        )
        return Response(ImportJobOut(job).data, status=status.HTTP_202_ACCEPTED)


class ImportDetailApi(RetrieveAPIView):
    permission_classes = [IsAdmin]
    serializer_class = ImportJobOut
    queryset = ImportJob.objects.all()
    lookup_url_kwarg = "job_id"

    def get_object(self):
        return import_job_live(super().get_object())


class ExportFiltersInput(serializers.Serializer):
    since = serializers.DateField(required=False)
    until = serializers.DateField(required=False)
    model_version = serializers.CharField(required=False, max_length=128)
    min_agreement = serializers.FloatField(required=False, min_value=0, max_value=1)
    include_unreviewed = serializers.BooleanField(required=False, default=False)
    include_imported = serializers.BooleanField(required=False, default=True)
    include_heldout = serializers.BooleanField(
        required=False, default=False, help_text="Conversations held out for evaluation too."
    )
    include_ab = serializers.BooleanField(
        required=False, default=False, help_text="Rankings of the promotion gate's blind A/B comparisons too."
    )

    def to_filters(self) -> exporting.ExportFilters:
        data = self.validated_data
        return exporting.ExportFilters(
            since=data.get("since"),
            until=data.get("until"),
            model_version=data.get("model_version"),
            min_agreement=data.get("min_agreement"),
            accepted_only=not data["include_unreviewed"],
            include_imported=data["include_imported"],
            include_heldout=data["include_heldout"],
            include_ab=data["include_ab"],
        )


class ExportApi(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        summary="Export training data (streamed JSONL)",
        parameters=[ExportFiltersInput],
        responses={(200, "application/x-ndjson"): OpenApiTypes.STR},
    )
    def get(self, request, kind: str):
        filters = ExportFiltersInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        if kind not in exporting.KINDS:
            raise serializers.ValidationError({"kind": f"Use one of {', '.join(exporting.KINDS)}."})
        response = StreamingHttpResponse(
            exporting.jsonl_lines(kind, filters.to_filters()), content_type="application/x-ndjson"
        )
        stamp = dt.date.today().isoformat()
        response["Content-Disposition"] = f'attachment; filename="{kind}-{stamp}.jsonl"'
        return response


class ExportCardApi(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        summary="The dataset card (README.md) for an export with these filters",
        parameters=[ExportFiltersInput],
        responses={(200, "text/markdown"): OpenApiTypes.STR},
    )
    def get(self, request):
        filters = ExportFiltersInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        chosen = filters.to_filters()
        counts = {kind: sum(1 for _ in exporting.ROWS[kind](chosen)) for kind in exporting.KINDS}
        return HttpResponse(exporting.dataset_card(counts, chosen), content_type="text/markdown; charset=utf-8")
