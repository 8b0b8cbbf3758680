from django.contrib.auth.decorators import login_required
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from labeling import apis as labeling
from labeling import data_apis as labeling_data
from models_service import apis as models
from training_jobs import apis as training

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="api-schema")), name="api-docs"),
    path("v1/tasks/next/", labeling.NextTaskApi.as_view(), name="api-next-task"),
    path("v1/assignments/", labeling.AssignmentListApi.as_view(), name="api-assignments"),
    path("v1/assignments/<int:assignment_id>/", labeling.AssignmentDetailApi.as_view(), name="api-assignment"),
    path("v1/assignments/<int:assignment_id>/submit/", labeling.SubmitApi.as_view(), name="api-submit"),
    path("v1/assignments/<int:assignment_id>/skip/", labeling.SkipApi.as_view(), name="api-skip"),
    path("v1/assignments/<int:assignment_id>/report/", labeling.ReportApi.as_view(), name="api-report"),
    path("v1/assignments/<int:assignment_id>/draft/", labeling.DraftApi.as_view(), name="api-draft"),
    path("v1/conversations/", labeling.ConversationListApi.as_view(), name="api-conversations"),
    path("v1/conversations/<int:conversation_id>/", labeling.ConversationDetailApi.as_view(), name="api-conversation"),
    path("v1/messages/<int:message_id>/", labeling.MessageDetailApi.as_view(), name="api-message"),
    path("v1/imports/", labeling_data.ImportCreateApi.as_view(), name="api-imports"),
    path("v1/imports/<int:job_id>/", labeling_data.ImportDetailApi.as_view(), name="api-import"),
    path("v1/exports/card/", labeling_data.ExportCardApi.as_view(), name="api-export-card"),
    path("v1/exports/<str:kind>/", labeling_data.ExportApi.as_view(), name="api-export"),
    path("v1/model-versions/", models.ModelVersionListApi.as_view(), name="api-model-versions"),
    path("v1/model-versions/<int:version_id>/", models.ModelVersionDetailApi.as_view(), name="api-model-version"),
    path("v1/training-runs/", training.TrainingRunListApi.as_view(), name="api-training-runs"),
    path("v1/training-runs/start/", training.TrainingRunCreateApi.as_view(), name="api-training-run-start"),
    path("v1/loop/outlook/", training.PoolOutlookApi.as_view(), name="api-loop-outlook"),
    path("v1/loop/train-now/", training.TrainNowApi.as_view(), name="api-loop-train-now"),
    path("v1/training-runs/<int:run_id>/", training.TrainingRunDetailApi.as_view(), name="api-training-run"),
    path(
        "v1/training-runs/<int:run_id>/cancel/", training.TrainingRunCancelApi.as_view(), name="api-training-run-cancel"
    ),
]
