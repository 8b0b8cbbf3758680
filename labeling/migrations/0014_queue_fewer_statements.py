"""labeling_lease_next() runs fewer statements per call (the rules are 0008's and unchanged; this is 0012's function
with its opening rewritten).

Each statement a plpgsql function runs costs an executor start and end, whatever it finds; on the queue's hot path
(bench/queue.py: every request a labeler with no lease) starting the statements was a fifth of the call. Counted with
callgrind on a PostgreSQL backend running 200 calls on 20,000 open tasks (instructions per call, the same figure
in repeated runs): 2,242,000 before, 2,142,000 after.
- Turning off the durable commit for the call is an assignment (a plpgsql expression evaluated without the
  executor) instead of a PERFORM (a query).
- Tasks marked busy whose time has come are put back among the free ones only when there are any: the profile
  read asks whether there are (an index probe); the UPDATE, which opened and locked all the task table's indexes
  even when it changed no row, runs only then.
- The kinds with free tasks are found in one statement instead of one per kind. The probe still reads the queue's
  index from its far end (see 0012).
"""

from django.db import migrations

from labeling.sql import queue_functions


class Migration(migrations.Migration):
    dependencies = [("labeling", "0013_assignment_drop_redundant_fk_indexes")]

    operations = [
        migrations.RunSQL(sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0014"), reverse_sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0012"))
    ]
