"""Assignments lose their own indexes on task and on labeler: the unique (task, labeler) index and the (labeler,
status) index lead with those columns, and every lease, submission and skip wrote the two extra indexes.

Only the indexes are dropped, concurrently: Django's own way (AlterField with db_index=False) drops and re-adds the
foreign keys, which locks the assignment, task and user tables until every assignment row has been checked."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

INDEXES = {"task_id": "labeling_assignment_task_id_49b6e1ee", "labeler_id": "labeling_assignment_labeler_id_25f91859"}


class Migration(migrations.Migration):
    atomic = False  # DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("labeling", "0012_queue_plans_without_statistics"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=f"DROP INDEX CONCURRENTLY IF EXISTS {name}",
                    reverse_sql=f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON labeling_assignment ({column})",
                )
                for column, name in INDEXES.items()
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="assignment",
                    name="labeler",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="assignments",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="assignment",
                    name="task",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="assignments",
                        to="labeling.task",
                    ),
                ),
            ],
        )
    ]
