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

from django.db import migrations

from labeling.sql import queue_functions


class Migration(migrations.Migration):
    dependencies = [("labeling", "0016_trust_revisions_exclusions_moderation")]

    operations = [
        migrations.RunSQL(sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0017"), reverse_sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0014"))
    ]
