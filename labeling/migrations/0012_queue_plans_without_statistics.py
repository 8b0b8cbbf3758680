"""The queue's plans no longer depend on the table statistics of the moment (migration 0011's function, changed
as listed in CHANGES; 0008 explains the rules, which are unchanged).

labeling_lease_next() keeps one generic plan per statement for the life of a connection (0011). Those plans were
made from the statistics at hand when the connection first called it. Right after an import, the statistics say
labeling_assignment is empty, and the plans scanned the whole table for "has this labeler done this task?",
"how many live leases?" and the earliest lease expiry: a call cost 3.4 ms of PostgreSQL time once 3,000 leases
existed, and grew with every lease until autovacuum analysed the table and the connections planned again.
Measured on the same data after this change: 0.74 ms per call.
- The function runs with enable_seqscan = off: every query in it is written for an index walk, and now gets one
  whatever the statistics say.
- The earliest live lease expiry is read by the same statement that counts the task's slots under the row lock;
  the separate query for it used the index of all live leases (rows=2 by the statistics; thousands in truth).
"""

import importlib

from django.db import migrations

previous = importlib.import_module("labeling.migrations.0011_queue_scans_skip_busy_tasks")

CHANGES = [
    # Plans by index whatever the statistics say.
    (
        "SET jit = off SET plan_cache_mode = force_generic_plan AS $$",
        "SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$",
    ),
    (
        "    v_taken integer;\n",
        "    v_taken integer;\n    v_first_expiry timestamptz;\n",
    ),
    # The count under the row lock also gives the earliest live lease expiry ...
    (
        """SELECT count(*) INTO v_taken FROM labeling_assignment a
                            WHERE a.task_id = v_task""",
        """SELECT count(*), min(a.lease_expires_at) FILTER (WHERE a.status = 'leased')
                              INTO v_taken, v_first_expiry
                              FROM labeling_assignment a
                            WHERE a.task_id = v_task""",
    ),
    # ... so marking the task busy is an update by primary key (least() skips a NULL: no other live lease).
    (
        """UPDATE labeling_task t SET free_slots_from = (
                                        SELECT min(a.lease_expires_at) FROM labeling_assignment a
                                         WHERE a.task_id = v_task AND a.status = 'leased' AND a.lease_expires_at > p_now)
                                     WHERE t.id = v_task;""",
        """UPDATE labeling_task SET free_slots_from = least(
                                        v_first_expiry, p_now + make_interval(mins => p_lease_minutes))
                                     WHERE id = v_task;""",
    ),
    (
        "RETURNS void LANGUAGE plpgsql VOLATILE AS $$",
        "RETURNS void LANGUAGE plpgsql VOLATILE SET enable_seqscan = off AS $$",
    ),
]


def lease_next_sql() -> str:
    sql = previous.lease_next_sql()
    for old, new in CHANGES:
        if sql.count(old) != 1:
            raise ValueError(f"migration 0012 expects exactly one {old!r} in 0011's function")
        sql = sql.replace(old, new)
    return sql


class Migration(migrations.Migration):
    dependencies = [("labeling", "0011_queue_scans_skip_busy_tasks")]

    operations = [migrations.RunSQL(sql=lease_next_sql(), reverse_sql=previous.lease_next_sql())]
