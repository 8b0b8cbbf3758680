from django.urls import path

from ops import views

app_name = "ops"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("loop/resume/", views.resume_loop, name="resume_loop"),
    path("loop/train-now/", views.train_on_what_there_is, name="train_now"),
    path("loop/rm-threshold/", views.set_rm_threshold, name="set_rm_threshold"),
    path("runs/", views.runs, name="runs"),
    path("runs/start/", views.start_run, name="start_run"),
    path("runs/<int:run_id>/", views.run_detail, name="run"),
    path("runs/<int:run_id>/data/", views.run_data, name="run_data"),
    path("runs/<int:run_id>/cancel/", views.cancel_run, name="cancel_run"),
    path("models/", views.models, name="models"),
    path("models/<int:version_id>/", views.model_detail, name="model"),
    path("models/<int:version_id>/activate/", views.activate_model, name="activate_model"),
    path("models/rollback/<str:kind>/", views.rollback, name="rollback"),
    path("evaluations/<int:evaluation_id>/", views.evaluation_detail, name="evaluation"),
    path("evaluations/<int:evaluation_id>/promote/", views.promote, name="promote"),
    path("labelers/", views.labelers, name="labelers"),
    path("workers/", views.workers, name="workers"),
    path("moderation/", views.moderation, name="moderation"),
    path("moderation/<int:conversation_id>/", views.moderate, name="moderate"),
    path("imports/", views.imports, name="imports"),
    path("imports/<int:job_id>/", views.import_detail, name="import"),
]
