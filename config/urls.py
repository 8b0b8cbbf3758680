from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config import views

admin.site.site_header = "Feedback Loop administration"
admin.site.site_title = "Feedback Loop"

urlpatterns = [
    path("", include("labeling.urls")),
    path("chat/", include("sampling.urls")),
    path("ops/", include("ops.urls")),
    path("api/", include("config.api_urls")),
    path("healthz", views.healthz, name="healthz"),
    path("favicon.ico", views.no_favicon),  # browsers ask on every page, Django admin's included
    path("login/", auth_views.LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]
