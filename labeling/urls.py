from django.urls import path

from labeling import views

app_name = "labeling"

urlpatterns = [
    path("", views.home, name="home"),
    path("guidelines/", views.guidelines, name="guidelines"),
    path("work/next/", views.next_task, name="next"),
    path("work/new-prompt/", views.write_prompt, name="write_prompt"),
    path("work/<int:assignment_id>/", views.work, name="work"),
    path("work/<int:assignment_id>/skip/", views.skip, name="skip"),
    path("work/<int:assignment_id>/report/", views.report, name="report"),
    path("work/<int:assignment_id>/draft/", views.save_draft, name="draft"),
    path("markdown/preview/", views.markdown_preview, name="markdown_preview"),
    path("mine/", views.mine, name="mine"),
    path("mine/messages/<int:message_id>/", views.edit_message, name="edit_message"),
    path("mine/rankings/<int:ranking_id>/", views.edit_ranking, name="edit_ranking"),
    path("profile/", views.profile, name="profile"),
    path("profile/api-token/", views.api_token, name="api_token"),
    path("profile/api-token/revoke/", views.api_token_revoke, name="api_token_revoke"),
]
