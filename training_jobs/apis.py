"""Training runs: their progress for any signed-in user, their data snapshots, configs, summaries and errors for
admins only; start and cancel for admins."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from config import stages
from config.api import IsAdmin, StaffSeesMore
from models_service.models import ModelVersion
from training_jobs import selectors, services
from training_jobs.models import TrainingRun


class TrainingRunOut(serializers.ModelSerializer):
    base_model = serializers.SlugRelatedField(slug_field="name", read_only=True)
    reward_model = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = TrainingRun
        fields = [
            "id",
            "kind",
            "status",
            "trigger",
            "base_model",
            "reward_model",
            "config",
            "progress_step",
            "progress_total",
            "summary",
            "error",
            "reason",
            "data_snapshot",
            "created_at",
            "started_at",
            "finished_at",
        ]


class TrainingRunPublicOut(TrainingRunOut):
    """What labelers may see of a run: what it is and how far it got, not its data or settings."""

    class Meta(TrainingRunOut.Meta):
        fields = [f for f in TrainingRunOut.Meta.fields if f not in ("config", "summary", "error", "data_snapshot")]


class _RunSerializerByRole(StaffSeesMore):
    serializer_class, staff_serializer_class = TrainingRunPublicOut, TrainingRunOut


class TrainingRunListApi(_RunSerializerByRole, ListAPIView):
    queryset = TrainingRun.objects.select_related("base_model", "reward_model").order_by("-created_at", "-pk")


class TrainingRunDetailApi(_RunSerializerByRole, RetrieveAPIView):
    queryset = TrainingRun.objects.select_related("base_model", "reward_model")
    lookup_url_kwarg = "run_id"


class TrainingRunCreateApi(APIView):
    permission_classes = [IsAdmin]

    class TrainingRunInput(serializers.Serializer):
        kind = serializers.ChoiceField(choices=list(stages.STAGES))
        config = serializers.DictField(required=False, default=dict)
        base_model = serializers.SlugRelatedField(
            slug_field="name", queryset=ModelVersion.objects.filter(kind="policy", status="ready"), required=False
        )
        reward_model = serializers.SlugRelatedField(
            slug_field="name", queryset=ModelVersion.objects.filter(kind="reward", status="ready"), required=False
        )

    @extend_schema(request=TrainingRunInput, responses={201: TrainingRunOut}, summary="Start a training run (admins)")
    def post(self, request):
        serializer = self.TrainingRunInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        run = services.training_run_create(triggered_by=request.user, **serializer.validated_data)
        return Response(TrainingRunOut(run).data, status=status.HTTP_201_CREATED)


class TrainingRunCancelApi(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(request=None, responses=TrainingRunOut, summary="Cancel a training run (admins)")
    def post(self, request, run_id: int):
        run = services.training_run_cancel(run=get_object_or_404(TrainingRun, pk=run_id), actor=request.user)
        return Response(TrainingRunOut(run).data)


class PoolOutlookOut(serializers.Serializer):
    have = serializers.IntegerField(help_text="New rankings that give pairs.")
    threshold = serializers.IntegerField()
    needed = serializers.IntegerField()
    prompts = serializers.IntegerField()
    fresh = serializers.IntegerField(help_text="Contexts the serving policy has not sampled yet.")
    resample = serializers.IntegerField(help_text="Contexts whose rankings all tied, waiting for new candidates.")
    open_tasks = serializers.IntegerField()
    in_flight = serializers.IntegerField()
    spent = serializers.IntegerField()
    tie_share = serializers.FloatField(allow_null=True)
    recent_rankings = serializers.IntegerField()
    expected = serializers.FloatField(allow_null=True, help_text="Rankings with pairs what is left should give.")
    stalled = serializers.BooleanField(help_text="Nothing is left to rank and the threshold is not reached.")
    short = serializers.BooleanField(help_text="The threshold is out of reach.")
    suggested_threshold = serializers.IntegerField()
    can_train_now = serializers.BooleanField()
    sentence = serializers.CharField()


class PoolOutlookApi(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(responses=PoolOutlookOut, summary="Can the ranking pool reach the reward-model threshold? (admins)")
    def get(self, request):
        return Response(PoolOutlookOut(selectors.pool_outlook()).data)


class TrainNowApi(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        request=None,
        responses={201: TrainingRunOut},
        summary="Train the reward model on what there is, below the threshold, recorded as a decision (admins)",
    )
    def post(self, request):
        run = services.loop_train_on_what_there_is(actor=request.user)
        return Response(TrainingRunOut(run).data, status=status.HTTP_201_CREATED)
