"""Create the configured PostgreSQL database if it does not exist yet: `python -m config.ensure_database`.

migrate cannot do this itself, because it needs to connect to the database it would create.
"""

import os
import sys

import psycopg
from psycopg import sql


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    from django.conf import settings

    db = settings.DATABASES["default"]
    params = {"host": db.get("HOST") or None, "port": db.get("PORT") or None, "user": db.get("USER") or None}
    if db.get("PASSWORD"):
        params["password"] = db["PASSWORD"]
    try:
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=10, **params) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
                print(f"created database {db['NAME']!r}")
    except psycopg.OperationalError as exc:
        print(f"cannot reach PostgreSQL at {params['host']}:{params['port']}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
