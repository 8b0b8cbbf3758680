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

import importlib

from django.db import migrations

previous = importlib.import_module("labeling.migrations.0012_queue_plans_without_statistics")

# 0012's function text -> this migration's, each part found exactly once.
COMMIT_SWITCH_0012 = "    PERFORM set_config('synchronous_commit', 'off', true);\n"
COMMIT_SWITCH = "    v_ignored := set_config('synchronous_commit', 'off', true);\n"

# From after the labeler's own lease is looked up to the draw of a kind.
OPENING_0012 = previous.LEASE_NEXT[
    previous.LEASE_NEXT.index("    -- Tasks marked busy until") : previous.LEASE_NEXT.index("    -- A kind is drawn")
]

OPENING = r"""    -- The labeler's routing profile; reviewing is for reviewers and staff. And whether any task marked busy
    -- until a lease ends (free_slots_from) has seen that time come.
    SELECT coalesce(p.languages::text[], '{}'), coalesce(p.topics::text[], '{}'), coalesce(p.is_reviewer, false) OR u.is_staff,
           EXISTS (SELECT 1 FROM labeling_task t
                    WHERE t.status = 'open' AND t.free_slots_from IS NOT NULL AND t.free_slots_from <= p_now)
      INTO p_languages, p_topics, v_reviewer, v_due
      FROM auth_user u LEFT JOIN labeling_labelerprofile p ON p.user_id = u.id
     WHERE u.id = p_user;

    -- Such tasks may have a free slot again: they go back among the free ones (NULL: "may have a slot"; the count
    -- under the row lock decides). So the scans below read one partial index of the free tasks and never walk
    -- past busy ones. Rows another caller holds are left for the next call.
    IF v_due THEN
        UPDATE labeling_task SET free_slots_from = NULL
         WHERE id IN (SELECT t.id FROM labeling_task t
                       WHERE t.status = 'open' AND t.free_slots_from IS NOT NULL AND t.free_slots_from <= p_now
                       ORDER BY t.free_slots_from LIMIT 100 FOR UPDATE SKIP LOCKED);
    END IF;

    -- Kinds with open tasks that may have a free slot (as in 0011), in the order given. Each probe reads the
    -- queue's index from its far end (the newest tasks of the lowest priority): the near end holds the entries of
    -- the tasks just leased, dead until the next vacuum, which every scan from there walks past. A scalar
    -- subquery, not EXISTS, so that the planner keeps that order.
    SELECT coalesce(array_agg(k.kind ORDER BY k.n), '{}'), coalesce(array_agg(k.weight ORDER BY k.n), '{}')
      INTO v_kinds, v_weights
      FROM unnest(p_kinds, p_weights) WITH ORDINALITY AS k(kind, weight, n)
     WHERE k.weight > 0 AND (k.kind <> 'review_demonstration' OR v_reviewer)
       AND (SELECT 1 FROM labeling_task t
             WHERE t.status = 'open' AND t.kind = k.kind AND t.free_slots_from IS NULL
               AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
             ORDER BY t.priority, t.created_at DESC, t.id DESC LIMIT 1) IS NOT NULL;

"""

DECLARE_0012 = "    v_best_topic boolean;\n"
DECLARE = DECLARE_0012 + "    v_due boolean;\n    v_ignored text;\n"


def lease_next_sql() -> str:
    template = previous.LEASE_NEXT
    for old, new in ((DECLARE_0012, DECLARE), (COMMIT_SWITCH_0012, COMMIT_SWITCH), (OPENING_0012, OPENING)):
        assert template.count(old) == 1, old
        template = template.replace(old, new)
    return (
        template.replace("{free}", previous.previous.FREE)
        .replace("{available}", previous.previous.AVAILABLE)
        .replace("{score}", previous.previous.SCORE)
        .replace("{window}", str(previous.previous.WINDOW))
    )


class Migration(migrations.Migration):
    dependencies = [("labeling", "0013_assignment_drop_redundant_fk_indexes")]

    operations = [migrations.RunSQL(sql=lease_next_sql(), reverse_sql=previous.lease_next_sql())]
