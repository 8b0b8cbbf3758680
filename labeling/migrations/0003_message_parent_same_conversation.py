"""A parent must be in its child's conversation, enforced by the database.

Django has no composite foreign keys, so this adds one in SQL: (parent_id, conversation_id) references
(id, conversation_id), which migration 0002 made unique.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("labeling", "0002_initial")]

    operations = [
        migrations.RunSQL(
            sql="""
                ALTER TABLE labeling_message
                ADD CONSTRAINT message_parent_in_same_conversation
                FOREIGN KEY (parent_id, conversation_id)
                REFERENCES labeling_message (id, conversation_id)
                ON DELETE CASCADE
            """,
            reverse_sql="ALTER TABLE labeling_message DROP CONSTRAINT message_parent_in_same_conversation",
        ),
    ]
