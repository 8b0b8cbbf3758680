from django.urls import path

from sampling import views

app_name = "chat"

urlpatterns = [
    path("", views.chat_index, name="chat_index"),
    path("<int:conversation_id>/", views.chat, name="chat"),
    path("requests/<int:request_id>/", views.chat_poll, name="chat_poll"),
    path("requests/<int:request_id>/retry/", views.chat_retry, name="chat_retry"),
    path("messages/<int:message_id>/alternatives/", views.chat_alternatives, name="chat_alternatives"),
    path(
        "messages/<int:message_id>/alternatives/status/",
        views.chat_alternatives_status,
        name="chat_alternatives_status",
    ),
    path("drafts/assignments/<int:assignment_id>/", views.draft_start, name="draft_start"),
    path("drafts/<int:request_id>/", views.draft_poll, name="draft_poll"),
    path("coming-work/", views.coming_work, name="coming_work"),
]
