"""The queue spreads a labeler's work over conversations (issue 15, item 6): the labeler's profile keeps the
conversation of their last submission, and labeling_lease_next()'s first window passes over its tasks; later
windows take them when nothing else of the drawn kind is free. `diff labeling/sql/lease_next_v0017.sql
labeling/sql/lease_next_v0018.sql` shows the whole change.
"""

import django.db.models.deletion
from django.db import migrations, models

from labeling.sql import queue_functions


class Migration(migrations.Migration):

    dependencies = [
        ('labeling', '0017_queue_exclusions'),
    ]

    operations = [
        migrations.AddField(
            model_name='labelerprofile',
            name='last_conversation',
            field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='labeling.conversation'),
        ),
        migrations.RunSQL(
            sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0018"),
            reverse_sql=queue_functions("task_refresh_slots_v0012", "lease_next_v0017"),
        ),
    ]
