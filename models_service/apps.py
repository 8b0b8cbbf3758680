from django.apps import AppConfig


class ModelsServiceConfig(AppConfig):
    name = "models_service"
    verbose_name = "Models"
