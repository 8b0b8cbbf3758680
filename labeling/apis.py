"""The labeling API: everything a labeler does in the browser, for scripts and other clients (imports and exports
for admins are in data_apis.py). Each view parses with an InputSerializer, calls one service, and renders an
OutputSerializer."""

from django.db.models import Prefetch
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, PolymorphicProxySerializer, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api import StaffSeesMore, StrictCharField
from labeling import services
from labeling.limits import MAX_MESSAGE_CHARS
from labeling.models import Assignment, CandidateFlag, Conversation, Message, Review, TaskKind
from labeling.selectors import CandidateHandles, candidate_handles, message_thread

MAX_CANDIDATES = 9  # a ranking has at most 9 candidates (RankingEntry's rank range)

# --- output ---


class MessageOut(serializers.ModelSerializer):
    """A message as labelers see it: never which model version wrote it (that would unblind the A/B gate)."""

    content = serializers.CharField(source="text")

    class Meta:
        model = Message
        fields = ["id", "parent", "role", "content", "origin", "review_status", "created_at"]


class StaffMessageOut(MessageOut):
    model_version = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta(MessageOut.Meta):
        fields = [*MessageOut.Meta.fields, "model_version"]


class TurnOut(serializers.Serializer):
    id = serializers.IntegerField()
    role = serializers.CharField()
    content = serializers.CharField(source="text")


class AssignmentOut(serializers.ModelSerializer):
    kind = serializers.CharField(source="task.kind")
    task_id = serializers.IntegerField(source="task.pk")
    language = serializers.CharField(source="task.language")
    tags = serializers.ListField(child=serializers.CharField(), source="task.tags")
    context = serializers.SerializerMethodField(help_text="The conversation so far, oldest first.")
    candidates = serializers.SerializerMethodField(help_text="Ranking tasks: the replies, in this labeler's order.")
    demonstration = serializers.SerializerMethodField(help_text="Review tasks: the reply under review.")

    class Meta:
        model = Assignment
        fields = [
            "id",
            "task_id",
            "kind",
            "status",
            "leased_at",
            "lease_expires_at",
            "language",
            "tags",
            "draft",
            "context",
            "candidates",
            "demonstration",
        ]

    def _context_message(self, assignment):
        task = assignment.task
        return task.parent_message or (task.target_message.parent if task.target_message else None)

    def get_context(self, assignment) -> list[dict]:
        message = self._context_message(assignment)
        return TurnOut(message_thread(message), many=True).data if message else []

    def get_candidates(self, assignment) -> list[dict]:
        """The replies in this labeler's order, each with an opaque handle (not its message id)."""
        if assignment.task.kind != TaskKind.RANK_REPLIES:
            return []
        by_id = {c.message_id: c.message for c in assignment.task.task_candidates.select_related("message")}
        handles = candidate_handles(assignment.task, assignment.labeler_id)
        order = services.display_order(assignment.task, assignment.labeler_id)
        return [{"id": handles[i], "content": by_id[i].text} for i in order]

    def get_demonstration(self, assignment) -> dict | None:
        message = assignment.task.target_message
        return {"id": message.pk, "content": message.text} if message else None


def _assignment_out(assignment) -> dict:
    return AssignmentOut(assignment).data


def _own_assignment(request, assignment_id) -> Assignment:
    return get_object_or_404(
        Assignment.objects.select_related("task__parent_message", "task__target_message"),
        pk=assignment_id,
        labeler=request.user,
    )


# --- the queue ---


class NextTaskApi(APIView):
    @extend_schema(
        summary="Lease the next task",
        description="The labeler's next task, with a lease; the same task again while the lease holds. "
        "`assignment` is null when there is nothing to do.",
        request=None,
        responses=inline_serializer("NextTask", {"assignment": AssignmentOut(allow_null=True)}),
    )
    def post(self, request):
        assignment = services.task_lease_next(user=request.user)
        return Response({"assignment": _assignment_out(assignment) if assignment else None})


class AssignmentListApi(ListAPIView):
    serializer_class = AssignmentOut

    def get_queryset(self):
        queryset = Assignment.objects.filter(labeler=self.request.user).select_related(
            "task__parent_message", "task__target_message"
        )
        status_filter = self.request.query_params.get("status")
        if status_filter:
            queryset = queryset.filter(status=status_filter)
        return queryset.order_by("-leased_at")

    @extend_schema(parameters=[OpenApiParameter("status", enum=Assignment.Status.values, required=False)])
    def get(self, request, *args, **kwargs):
        status_filter = request.query_params.get("status")
        if status_filter and status_filter not in Assignment.Status.values:
            raise serializers.ValidationError({"status": f"Use one of {', '.join(Assignment.Status.values)}."})
        return super().get(request, *args, **kwargs)


class AssignmentDetailApi(APIView):
    @extend_schema(responses=AssignmentOut)
    def get(self, request, assignment_id: int):
        return Response(_assignment_out(_own_assignment(request, assignment_id)))


class SubmitApi(APIView):
    """Submit a task. The body depends on its kind; a repeated submission returns the first one's result."""

    class WriteInput(serializers.Serializer):
        text = StrictCharField(max_length=MAX_MESSAGE_CHARS, trim_whitespace=False)
        language = StrictCharField(max_length=16, required=False, default="en")
        tags = serializers.ListField(child=StrictCharField(max_length=48), required=False, max_length=10)
        time_spent_ms = serializers.IntegerField(required=False, min_value=0, max_value=86_400_000)

    class RankInput(serializers.Serializer):
        order = serializers.ListField(
            child=serializers.ListField(
                child=StrictCharField(max_length=32), allow_empty=False, max_length=MAX_CANDIDATES
            ),
            allow_empty=False,
            max_length=MAX_CANDIDATES,
            help_text="Groups of the candidates' ids (their handles), best group first; a group of several is a tie.",
        )
        flags = serializers.DictField(
            child=serializers.ListField(
                child=serializers.ChoiceField(choices=CandidateFlag.values), max_length=len(CandidateFlag.values)
            ),
            required=False,
            help_text="Candidate id (handle) -> flags.",
        )
        quality_rating = serializers.IntegerField(min_value=1, max_value=7, required=False, allow_null=True)
        all_unacceptable = serializers.BooleanField(required=False, default=False)
        confirm_untouched = serializers.BooleanField(required=False, default=False)
        improvement = StrictCharField(
            max_length=MAX_MESSAGE_CHARS,
            required=False,
            allow_blank=True,
            default="",
            trim_whitespace=False,
            help_text="Your own better reply when none is good enough (a demonstration, reviewed like any; once "
            "accepted it counts as better than every candidate).",
        )
        time_spent_ms = serializers.IntegerField(required=False, min_value=0, max_value=86_400_000)

        def validate_flags(self, flags):
            if len(flags) > MAX_CANDIDATES:
                raise serializers.ValidationError(f"At most {MAX_CANDIDATES} candidates can be flagged.")
            return flags

    class ReviewInput(serializers.Serializer):
        decision = serializers.ChoiceField(choices=Review.Decision.values)
        reason = StrictCharField(max_length=2000, required=False, allow_blank=True, default="")
        time_spent_ms = serializers.IntegerField(required=False, min_value=0, max_value=86_400_000)

    class Output(serializers.Serializer):
        assignment = serializers.IntegerField()
        created = serializers.BooleanField(help_text="False when this repeated an earlier submission.")
        result_type = serializers.CharField()
        result_id = serializers.IntegerField(allow_null=True)

    @extend_schema(
        summary="Submit a leased task",
        request=PolymorphicProxySerializer(
            component_name="Submission",
            serializers=[WriteInput, RankInput, ReviewInput],
            resource_type_field_name=None,
        ),
        description="Write tasks: {text, language?, tags?}. Ranking: {order: [[id], [id, id], ...] with the "
        "candidates' ids as the task gives them, flags?, quality_rating?, all_unacceptable?, confirm_untouched?, "
        "improvement?}. Review: {decision: accept|reject, reason?}.",
        responses={201: Output, 200: Output},
    )
    def post(self, request, assignment_id: int):
        assignment = _own_assignment(request, assignment_id)
        kind = assignment.task.kind
        if kind == TaskKind.RANK_REPLIES:
            data = self._valid(self.RankInput, request)
            candidates = CandidateHandles.of(assignment.task, assignment.labeler_id)
            unknown = candidates.unknown(h for group in data["order"] for h in group)
            unknown_flags = candidates.unknown(data.get("flags", {}))
            if unknown or unknown_flags:
                field = "order" if unknown else "flags"
                raise serializers.ValidationError(
                    {field: [f"Not candidates of this task: {', '.join(unknown or unknown_flags)}."]}
                )
            work = {
                "ranking": services.RankingInput(
                    order=candidates.order_ids(data["order"]),
                    flags=candidates.flag_ids(data.get("flags", {})),
                    quality_rating=data.get("quality_rating"),
                    all_unacceptable=data["all_unacceptable"],
                    confirm_untouched=data["confirm_untouched"],
                    improvement=data["improvement"],
                )
            }
        elif kind == TaskKind.REVIEW_DEMONSTRATION:
            data = self._valid(self.ReviewInput, request)
            work = {"decision": data["decision"], "reason": data["reason"]}
        elif kind == TaskKind.WRITE_PROMPT:
            data = self._valid(self.WriteInput, request)
            work = {"text": data["text"], "language": data["language"], "tags": data.get("tags", [])}
        else:
            data = self._valid(self.WriteInput, request)
            work = {"text": data["text"]}
        result = services.assignment_submit(assignment=assignment, time_spent_ms=data.get("time_spent_ms"), **work)
        body = {
            "assignment": assignment.pk,
            "created": result.created,
            "result_type": type(result.result).__name__.lower() if result.result is not None else "none",
            "result_id": getattr(result.result, "pk", None),
        }
        return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)

    @staticmethod
    def _valid(serializer_class, request) -> dict:
        if not isinstance(request.data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Send a JSON object."]})
        serializer = serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data


class SkipApi(APIView):
    class SkipInput(serializers.Serializer):
        reason = StrictCharField(max_length=500)

    @extend_schema(request=SkipInput, responses=AssignmentOut)
    def post(self, request, assignment_id: int):
        assignment = _own_assignment(request, assignment_id)  # someone else's: a 404 before the body is read
        serializer = self.SkipInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        assignment = services.assignment_skip(assignment=assignment, reason=serializer.validated_data["reason"])
        return Response(_assignment_out(assignment))


class ReportApi(APIView):
    class ReportInput(serializers.Serializer):
        reason = serializers.ChoiceField(choices=Assignment.ReportReason.values)
        note = StrictCharField(max_length=500, required=False, allow_blank=True, default="")

    @extend_schema(request=ReportInput, responses=AssignmentOut)
    def post(self, request, assignment_id: int):
        assignment = _own_assignment(request, assignment_id)  # someone else's: a 404 before the body is read
        serializer = self.ReportInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        assignment = services.assignment_report(assignment=assignment, **serializer.validated_data)
        return Response(_assignment_out(assignment))


class DraftApi(APIView):
    class DraftInput(serializers.Serializer):
        text = StrictCharField(max_length=MAX_MESSAGE_CHARS, allow_blank=True, trim_whitespace=False)

    @extend_schema(request=DraftInput, responses=AssignmentOut, summary="Save a draft (and extend the lease)")
    def post(self, request, assignment_id: int):
        assignment = _own_assignment(request, assignment_id)  # someone else's: a 404 before the body is read
        serializer = self.DraftInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        assignment = services.assignment_save_draft(assignment=assignment, draft=serializer.validated_data["text"])
        return Response(_assignment_out(assignment))


# --- conversations ---


class ConversationOut(serializers.ModelSerializer):
    """A conversation as labelers see it: not its split (held out or not) nor its messages' model versions."""

    messages = MessageOut(many=True, read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "source", "dataset", "language", "tags", "created_at", "messages"]


class StaffConversationOut(ConversationOut):
    messages = StaffMessageOut(many=True, read_only=True)

    class Meta(ConversationOut.Meta):
        fields = [*ConversationOut.Meta.fields, "split"]


def visible_conversations(user):
    """Admins (the ops permission) see every conversation; labelers those they started or wrote in, without the
    blind A/B replies of
    the gate's evaluations (a labeler who saw them could tell the policies apart in the next comparison)."""
    if user.has_perm("training_jobs.operate_loop"):
        return Conversation.objects.prefetch_related("messages__model_version")
    shown = Message.objects.exclude(sampling_params__has_key="evaluation").select_related("model_version")
    conversations = Conversation.objects.prefetch_related(Prefetch("messages", queryset=shown))
    return conversations.filter(
        pk__in=Message.objects.filter(author=user).values("conversation_id")
    ) | conversations.filter(created_by=user)


class ConversationListApi(StaffSeesMore, ListAPIView):
    serializer_class, staff_serializer_class = ConversationOut, StaffConversationOut

    def get_queryset(self):
        return visible_conversations(self.request.user).distinct().order_by("-created_at", "-pk")


class ConversationDetailApi(StaffSeesMore, RetrieveAPIView):
    serializer_class, staff_serializer_class = ConversationOut, StaffConversationOut
    lookup_url_kwarg = "conversation_id"

    def get_queryset(self):
        return visible_conversations(self.request.user).distinct()


class MessageDetailApi(StaffSeesMore, RetrieveAPIView):
    serializer_class, staff_serializer_class = MessageOut, StaffMessageOut
    lookup_url_kwarg = "message_id"

    def get_queryset(self):
        visible = visible_conversations(self.request.user).values("pk")
        messages = Message.objects.filter(conversation_id__in=visible).select_related("model_version")
        if not self.request.user.has_perm("training_jobs.operate_loop"):
            messages = messages.exclude(sampling_params__has_key="evaluation")  # blind A/B replies
        return messages
