"""Four foreign keys of tasks that most tasks leave empty (target message, model version, reserved for, created by)
are indexed only where set.

Every lease that takes a task's last slot marks the task busy (free_slots_from), an update that cannot be HOT
since that column is indexed, so it wrote an entry into every index of the task table: into each of these four a
duplicate NULL key, until the pages filled and PostgreSQL cleaned them up from within the next insert. Partial
indexes skip those rows; the lookups that use these indexes (deleting the user, message or model version a task
points to) name a value, which a partial index WHERE ... IS NOT NULL serves. Counted with callgrind on the queue
function (see 0014): 98,000 fewer instructions per lease, of 2,242,000.

The new indexes are built concurrently before the old ones are dropped, concurrently (as in 0013), so that no
table is locked against writes meanwhile.
"""

from django.conf import settings
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models
from django.db.models.deletion import CASCADE, PROTECT, SET_NULL

# field -> its full index until now
OLD_INDEXES = {
    "target_message": "labeling_task_target_message_id_d07e1cfa",
    "model_version": "labeling_task_model_version_id_861f310c",
    "reserved_for": "labeling_task_reserved_for_id_9be7b2cd",
    "created_by": "labeling_task_created_by_id_1428b930",
}


def without_index(name, to, on_delete, related_name, **options):
    """The state of a nullable foreign key of Task whose own index is gone."""
    return migrations.AlterField(
        model_name="task",
        name=name,
        field=models.ForeignKey(
            blank=True, db_index=False, null=True, on_delete=on_delete, related_name=related_name, to=to, **options
        ),
    )


class Migration(migrations.Migration):
    atomic = False  # CREATE and DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("labeling", "0014_queue_fewer_statements"),
        ("models_service", "0003_load_error_and_sampling_requests"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        *(
            AddIndexConcurrently(
                model_name="task",
                index=models.Index(condition=models.Q((f"{name}__isnull", False)), fields=[name], name=f"task_{name}"),
            )
            for name in OLD_INDEXES
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=f"DROP INDEX CONCURRENTLY IF EXISTS {index}",
                    reverse_sql=f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON labeling_task ({name}_id)",
                )
                for name, index in OLD_INDEXES.items()
            ],
            state_operations=[
                without_index("created_by", settings.AUTH_USER_MODEL, SET_NULL, "+"),
                without_index(
                    "model_version",
                    "models_service.modelversion",
                    PROTECT,
                    "tasks",
                    help_text="The policy that sampled the candidates.",
                ),
                without_index(
                    "reserved_for",
                    settings.AUTH_USER_MODEL,
                    CASCADE,
                    "reserved_tasks",
                    help_text="Only this labeler is offered the task (e.g. alternatives they asked for in chat).",
                ),
                without_index(
                    "target_message",
                    "labeling.message",
                    CASCADE,
                    "tasks_as_target",
                    help_text="The demonstration under review.",
                ),
            ],
        ),
    ]
