"""The queue's hot path as one PostgreSQL function: labeling_lease_next().

One round trip gives a labeler their next task slot. Done in Python it took ~17 queries and, with 50 labelers
asking at once, many rounds of them all reaching for the same best tasks. Here the best available task of the
chosen kind is locked with FOR UPDATE SKIP LOCKED, so concurrent callers each get a different row.

Rules (the Python side passes the labeler and the admin's settings; the profile is read here):
- a live lease the labeler already holds is returned again;
- a task kind is drawn by weight among the kinds with work for this labeler (`p_draws` are uniform random
  numbers from the caller, so tests can seed them);
- a task is available when it is open, has a free slot (submitted + live leases < overlap), is not reserved
  for someone else, was not done/skipped/reported by this labeler, and does not involve their own message
  (a candidate they wrote, the message to reply to, the demonstration to review);
- the best task has the highest priority, then the highest waiting time in minutes (capped) plus the
  language and topic bonuses. It is among the first rows of three index-ordered windows (all, in the
  labeler's languages, on their topics), so only those rows are scored;
- candidates are tried best first: a first pass skips rows that another caller has locked (so concurrent
  callers spread over different tasks), a second pass waits for those locks (a task with overlap 2 may still
  have a slot once the other caller commits);
- under the row lock the free slots are counted again in a new statement (a fresh snapshot), so two callers
  never take more slots than the overlap;
- labeling_task.free_slots_from caches "every slot is taken until this time" (the earliest lease expiry), so
  the windows skip busy tasks without counting their leases. labeling_task_refresh_slots() recomputes it;
  the lease function calls it after a lease, the services after a submission, a skip, a report or a lease
  extension. A stale value only hides a task until that time; the count under the lock stays authoritative.
"""

from django.db import migrations

from labeling.sql import queue_functions

DROP = """
DROP FUNCTION IF EXISTS labeling_task_refresh_slots(bigint, timestamptz);
DROP FUNCTION IF EXISTS labeling_lease_next(integer, timestamptz, text[], float8[], float8[], integer, float8,
                                            float8, float8);
"""


class Migration(migrations.Migration):
    dependencies = [("labeling", "0007_task_free_slots_from")]

    operations = [
        migrations.RunSQL(sql=queue_functions("task_refresh_slots_v0008", "lease_next_v0008"), reverse_sql=DROP)
    ]
