"""labeling_lease_next() keeps two more kinds of task from a labeler (0014's function, the rule "available" of
0011 with two conditions added; nothing else changes):
- a task whose payload names the labeler in "not_for": the rewrite of a rejected reply is not offered to the
  labeler who wrote it, the blind A/B comparison of a prompt not to the prompt's author;
- any task on a conversation the labeler skipped as content they would rather not work on, or reported
  (labeling_conversationexclusion), whichever branch or task kind it comes through;
- any task on a conversation hidden after reports (until an admin keeps it) or removed by an admin;
- a blind A/B comparison once the labeler took "votes_per_labeler" of its evaluation's comparisons (the payload
  says both), so that one labeler cannot decide an evaluation.
"""

import importlib

from django.db import migrations

previous = importlib.import_module("labeling.migrations.0014_queue_fewer_statements")
fragments = importlib.import_module("labeling.migrations.0011_queue_scans_skip_busy_tasks")

AVAILABLE_END = """            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
)"""

AVAILABLE_END_NOW = """            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
       AND NOT coalesce(t.payload -> 'not_for' @> to_jsonb(p_user), false)
       AND (t.conversation_id IS NULL OR (
           NOT EXISTS (SELECT 1 FROM labeling_conversationexclusion x
                       WHERE x.labeler_id = p_user AND x.conversation_id = t.conversation_id)
           AND (SELECT c.moderation FROM labeling_conversation c WHERE c.id = t.conversation_id)
               NOT IN ('hidden', 'removed')))
       AND (NOT (t.payload ? 'votes_per_labeler')
            OR (SELECT count(*) FROM labeling_assignment a JOIN labeling_task e ON e.id = a.task_id
                WHERE a.labeler_id = p_user AND a.status IN ('leased', 'submitted')
                  AND e.payload -> 'evaluation' = t.payload -> 'evaluation')
               < (t.payload ->> 'votes_per_labeler')::integer)
)"""


def available() -> str:
    assert fragments.AVAILABLE.count(AVAILABLE_END) == 1
    return fragments.AVAILABLE.replace(AVAILABLE_END, AVAILABLE_END_NOW)


def lease_next_sql() -> str:
    text = previous.lease_next_sql()
    assert text.count(fragments.AVAILABLE) >= 1
    return text.replace(fragments.AVAILABLE, available())


class Migration(migrations.Migration):
    dependencies = [("labeling", "0016_trust_revisions_exclusions_moderation")]

    operations = [migrations.RunSQL(sql=lease_next_sql(), reverse_sql=previous.lease_next_sql())]
