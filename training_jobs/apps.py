from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_ops_group(sender, using="default", **kwargs) -> None:
    """After every migrate (and every flush), the Ops group exists and holds the permission to operate the loop, as
    Django's own permissions are made then: admins give ops powers by adding people to it."""
    from django.contrib.auth.models import Group, Permission

    permission = (
        Permission.objects.using(using).filter(content_type__app_label="training_jobs", codename="operate_loop").first()
    )
    if permission is None:  # the auth app's handler has not made it yet in this run
        return
    group, _ = Group.objects.using(using).get_or_create(name="Ops")
    group.permissions.add(permission)


class TrainingJobsConfig(AppConfig):
    name = "training_jobs"
    verbose_name = "Training"

    def ready(self) -> None:
        post_migrate.connect(ensure_ops_group, dispatch_uid="training_jobs.ensure_ops_group")
