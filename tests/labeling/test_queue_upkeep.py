"""Beat's upkeep of the queue's tables: they are vacuumed once they hold dead rows (every lease leaves one)."""

import pytest
from django.db import connection, transaction
from django.db.models import F

from config.celery_app import beat_schedule_entries
from labeling import services, tasks
from labeling.models import Task
from tests.support.labeling import make_reply_task

pytestmark = pytest.mark.django_db(transaction=True)


def dead_rows(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", [table])
        return cursor.fetchone()[0]


def flush_statistics() -> None:
    """Make this connection's row counts visible in pg_stat_user_tables now rather than within a second."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")


def test_tables_with_dead_rows_are_vacuumed_and_the_others_left_alone():
    for _ in range(20):
        make_reply_task()
    for _ in range(30):  # 600 dead versions of task rows
        Task.objects.update(priority=F("priority") + 1)
    flush_statistics()
    assert dead_rows("labeling_task") >= 600

    assert services.queue_tables_vacuum(min_dead_rows=10_000) == []
    assert services.queue_tables_vacuum(min_dead_rows=500) == ["labeling_task"]
    assert dead_rows("labeling_task") == 0
    assert services.queue_tables_vacuum(min_dead_rows=500) == []


def maintenance_counts(table: str) -> tuple[int, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = %s", [table])
        return cursor.fetchone()


def test_statistics_are_renewed_only_once_a_tenth_of_the_table_changed():
    for _ in range(40):
        make_reply_task()
    services.queue_tables_vacuum(min_dead_rows=0)  # both tables analysed: a clean start
    vacuums, analyses = maintenance_counts("labeling_task")

    for _ in range(3):  # 3 updates of 40 rows: 120 dead rows, 120 changes, three times the table
        Task.objects.update(priority=F("priority") + 1)
    flush_statistics()
    assert services.queue_tables_vacuum(min_dead_rows=100, analyze_fraction=10.0) == ["labeling_task"]
    assert maintenance_counts("labeling_task") == (vacuums + 1, analyses)  # vacuumed, statistics left alone

    Task.objects.filter(pk__in=Task.objects.values("pk")[:20]).update(priority=F("priority") + 1)
    flush_statistics()
    assert services.queue_tables_vacuum(min_dead_rows=100, analyze_fraction=1.0) == ["labeling_task"]
    # 140 changes since the last analysis >= the 40 rows; 20 dead rows < 100: analysed, not vacuumed
    assert maintenance_counts("labeling_task") == (vacuums + 1, analyses + 1)
    assert services.queue_tables_vacuum(min_dead_rows=100, analyze_fraction=1.0) == []


def test_it_refuses_to_run_inside_a_transaction():
    with transaction.atomic(), pytest.raises(RuntimeError, match="outside atomic"):
        services.queue_tables_vacuum()


def test_beat_runs_it_on_its_schedule(settings):
    settings.QUEUE_VACUUM_SCHEDULE_S = 7
    entry = beat_schedule_entries()["vacuum-queue-tables"]
    assert entry["task"] == tasks.vacuum_queue_tables.name and entry["schedule"] == 7.0
    assert services.queue_tables_vacuum(min_dead_rows=0) == ["labeling_assignment", "labeling_task"]
    assert tasks.vacuum_queue_tables.apply().get() == []  # nothing dead left: nothing to do
