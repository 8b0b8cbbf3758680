from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("", views.chat_index, name="chat_index"),
    path("<int:conversation_id>/", views.chat, name="chat"),
    path("requests/<int:request_id>/", views.chat_poll, name="chat_poll"),
    path("messages/<int:message_id>/alternatives/", views.chat_alternatives, name="chat_alternatives"),
]
