"""The queue's PL/pgSQL functions have one source, labeling/sql/: what runs in PostgreSQL is the newest file."""

import datetime as dt
import re

import pytest
from django.db import connection
from django.utils import timezone

from labeling import sql
from labeling.models import Assignment
from labeling.selectors import live_assignments
from tests.support.factories import UserFactory
from tests.support.labeling import make_reply_task

pytestmark = pytest.mark.django_db


def _header_and_body(text: str) -> tuple[str, str]:
    header, body = re.fullmatch(r"(?s)(CREATE OR REPLACE FUNCTION .*?) AS \$\$(.*)\$\$;\n", text).groups()
    return header, body


@pytest.mark.parametrize("function", sorted(sql.FUNCTIONS))
def test_the_deployed_function_is_the_newest_file(function):
    header, body = _header_and_body(sql.read(sql.newest(function)))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc, coalesce(proconfig, '{}') FROM pg_proc WHERE proname = %s", [sql.FUNCTIONS[function]]
        )
        rows = cursor.fetchall()
    assert len(rows) == 1, f"{sql.FUNCTIONS[function]} is deployed {len(rows)} times (an old signature left over?)"
    deployed_body, deployed_config = rows[0]
    assert deployed_body == body, f"the deployed {function} differs from {sql.newest(function)}.sql"
    declared = re.findall(r"SET (\w+) = (\w+)", header)
    assert sorted(f"{name}={value}" for name, value in declared) == sorted(deployed_config)


def test_a_changed_file_would_be_caught():
    """The comparison above is exact: one character more in the body is a difference."""
    _, body = _header_and_body(sql.read(sql.newest("lease_next")))
    with connection.cursor() as cursor:
        cursor.execute("SELECT prosrc FROM pg_proc WHERE proname = 'labeling_lease_next'")
        assert cursor.fetchone()[0] != body + " "


def test_every_version_file_is_one_function():
    for path in sorted(sql.DIRECTORY.glob("*.sql")):
        function = path.stem.rsplit("_v", 1)[0]
        assert function in sql.FUNCTIONS, path.name
        header, _ = _header_and_body(path.read_text())
        assert header.startswith(f"CREATE OR REPLACE FUNCTION {sql.FUNCTIONS[function]}("), path.name
        assert header.count("CREATE OR REPLACE FUNCTION") == 1, path.name


def test_the_live_slot_rule_is_written_the_same_everywhere():
    """Every place the newest functions decide whether an assignment holds a slot uses the one rule."""
    for function in sql.FUNCTIONS:
        text = sql.read(sql.newest(function))
        uses = text.count("a.status = 'submitted'")
        assert uses >= 1
        assert text.count(sql.LIVE_SLOT_RULE) == uses, function


def test_the_orm_rule_and_the_sql_rule_pick_the_same_assignments():
    now = timezone.now()
    task = make_reply_task()
    task.overlap = 10
    task.save()
    states = [
        (Assignment.Status.SUBMITTED, now - dt.timedelta(minutes=5)),
        (Assignment.Status.SUBMITTED, now + dt.timedelta(minutes=5)),
        (Assignment.Status.LEASED, now + dt.timedelta(minutes=5)),
        (Assignment.Status.LEASED, now - dt.timedelta(minutes=5)),
        (Assignment.Status.LEASED, now),  # expiring this instant: no longer live
        (Assignment.Status.REPORTED, now + dt.timedelta(minutes=5)),
        (Assignment.Status.EXPIRED, now - dt.timedelta(minutes=5)),
        (Assignment.Status.SKIPPED, now + dt.timedelta(minutes=5)),
    ]
    for status, expires in states:
        Assignment.objects.create(
            task=task, labeler=UserFactory(), status=status, leased_at=now - dt.timedelta(minutes=30),
            lease_expires_at=expires, submitted_at=now if status == Assignment.Status.SUBMITTED else None,
            report_reason="spam" if status == Assignment.Status.REPORTED else "",
        )  # fmt: skip
    by_orm = set(Assignment.objects.filter(live_assignments(now), task=task).values_list("pk", flat=True))
    rule = sql.LIVE_SLOT_RULE.replace("p_now", "%s")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT a.id FROM labeling_assignment a WHERE a.task_id = %s AND {rule}", [task.pk, now])
        by_sql = {row[0] for row in cursor.fetchall()}
    assert by_orm == by_sql
    assert len(by_sql) == 3
