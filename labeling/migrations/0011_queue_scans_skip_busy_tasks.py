"""The queue's scans skip busy tasks, and labeling_lease_next() keeps its plans (migration 0008 explains the rules,
which are unchanged).

Measured on 20,000 open tasks with 1,000 of them fully leased (labelers who took a task and left), one call took
4.4 ms of PostgreSQL time, most of it not spent on the rows:
- plpgsql planned the big window query again at nearly every call (a custom plan per call), because the generic
  plan it compared against cost more than JIT's threshold: when it was used, JIT compilation took 55 ms. The
  function now runs with `jit = off` and `plan_cache_mode = force_generic_plan`; its queries are written so that
  their generic plans are the index walks the custom plans were.
- "not a reply to the labeler's own message" was an EXISTS that the generic plan turned into a scan of every
  message of the author (all of them, when one author wrote the prompts); it is now a lookup by primary key.
- labeling_task_refresh_slots() was a LANGUAGE sql function, which PostgreSQL plans at every call; it is plpgsql.
  After a lease the function no longer calls it: the count under the row lock already says whether the lease
  took the last slot, and only then is the task marked busy (a task with a slot left is not updated at all).
- the index walks read past every fully leased task (they stay open until their leases end), so a call cost more
  with every abandoned lease. Open tasks that may have a free slot now have their own partial index; a busy task
  whose time has come (free_slots_from <= now, from a second index) is put back among them by the next call.
- a labeler's live lease was looked up by walking every live lease; it has its own index.
"""

from django.db import migrations, models

from labeling.sql import queue_functions


class Migration(migrations.Migration):
    dependencies = [("labeling", "0010_import_jobs")]

    operations = [
        # Replaced by task_open_free_queue_order: no query reads it any more, and every task write kept it up to date.
        migrations.RemoveIndex(model_name="task", name="task_open_queue_order"),
        migrations.AddIndex(
            model_name="assignment",
            index=models.Index(
                condition=models.Q(("status", "leased")), fields=["labeler", "-leased_at"], name="assignment_leased_by"
            ),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("free_slots_from__isnull", True), ("status", "open")),
                fields=["kind", "-priority", "created_at", "id"],
                name="task_open_free_queue_order",
            ),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("free_slots_from__isnull", False), ("status", "open")),
                fields=["free_slots_from"],
                name="task_open_busy_until",
            ),
        ),
        migrations.RunSQL(sql=queue_functions("task_refresh_slots_v0011", "lease_next_v0011"), reverse_sql=queue_functions("task_refresh_slots_v0008", "lease_next_v0008")),
    ]
