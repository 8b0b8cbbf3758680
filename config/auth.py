"""The authentication backend: Django's ModelBackend, with a cheaper lookup of the signed-in user.

Every signed-in request loads its user. ModelBackend does it with `User.objects.get(pk=...)`, and building and
compiling that query took about a quarter of the web process's CPU on the queue's hot path (bench/queue.py),
more than the query itself. Here the SQL is written once per process and the row becomes a user with
`Model.from_db`, as the ORM would make it. The rules are ModelBackend's: an unknown id or an inactive user
gives None (the visitor is signed out).
"""

from functools import cached_property

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.db import connections, router


class UserLookupBackend(ModelBackend):
    @cached_property
    def _user_query(self) -> tuple[type, str, str, list[str]]:
        model = get_user_model()
        database = router.db_for_read(model)
        quote = connections[database].ops.quote_name
        fields = model._meta.concrete_fields
        sql = "SELECT {} FROM {} WHERE {} = %s".format(
            ", ".join(quote(field.column) for field in fields),
            quote(model._meta.db_table),
            quote(model._meta.pk.column),
        )
        return model, database, sql, [field.attname for field in fields]

    def get_user(self, user_id):
        model, database, sql, attnames = self._user_query
        # user_id comes from django.contrib.auth.get_user(), already converted with the primary key's to_python().
        with connections[database].cursor() as cursor:
            cursor.execute(sql, [user_id])
            row = cursor.fetchone()
        if row is None:
            return None
        user = model.from_db(database, attnames, row)
        return user if self.user_can_authenticate(user) else None
