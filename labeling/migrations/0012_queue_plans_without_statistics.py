"""The queue's plans no longer depend on the table statistics of the moment, and a call does less work when
labelers ask at once (0008 explains the rules, which are unchanged; 0011 the indexes).

labeling_lease_next() keeps one generic plan per statement for the life of a connection (0011). Those plans were
made from the statistics at hand when the connection first called it. Right after an import, the statistics say
labeling_assignment is empty, and the plans scanned the whole table for "has this labeler done this task?",
"how many live leases?" and the earliest lease expiry: a call cost 3.4 ms of PostgreSQL time once 3,000 leases
existed, and grew with every lease until autovacuum analysed the table and the connections planned again.
Measured on the same data after this change: 0.3 ms.
- The functions run with enable_seqscan = off: every query in them is written for an index walk, and now gets
  one whatever the statistics say.
- When every row of a window was locked by other callers, the function waited for the first of those locks,
  then for the next, and only then read the next window; with 16 callers at once on the same best tasks, most
  calls did so. Now a locked row is passed over and the next window read (four windows at most); only when no
  unlocked candidate is left does it wait for the rows it passed over, best first.
- The kinds are probed for open tasks (before the draw, as in 0011) from the far end of the queue's index, where
  no dead entries of just-leased tasks lie.
- The count under the row lock also reads the earliest live lease expiry, so marking a task busy is an update by
  primary key (the separate query used the index of all live leases, which the statistics said held 2 rows).
- Taking a slot back after an expired lease of one's own and taking a new one are one INSERT ... ON CONFLICT.
- Autovacuum (where it runs) takes up the queue's tables after 1,000 dead rows rather than a fifth of the table:
  each lease that takes a task's last slot leaves a dead entry at the front of the queue's index, where every
  call starts reading. Beat also vacuums them (labeling.services.queue_tables_vacuum), for servers with
  autovacuum off.
"""

from django.db import migrations

from labeling.sql import queue_functions

AUTOVACUUM = """
ALTER TABLE labeling_task SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                               autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE labeling_assignment SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                     autovacuum_analyze_scale_factor = 0.05);
"""

AUTOVACUUM_DEFAULTS = """
ALTER TABLE labeling_task RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
                                 autovacuum_analyze_scale_factor);
ALTER TABLE labeling_assignment RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
                                       autovacuum_analyze_scale_factor);
"""


class Migration(migrations.Migration):
    dependencies = [("labeling", "0011_queue_scans_skip_busy_tasks")]

    operations = [
        migrations.RunSQL(sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0012"), reverse_sql=queue_functions("task_refresh_slots_v0011", "lease_next_v0011")),
        migrations.RunSQL(sql=AUTOVACUUM, reverse_sql=AUTOVACUUM_DEFAULTS),
    ]
