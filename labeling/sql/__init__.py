"""The queue's PL/pgSQL functions, one file per version of each function: `<function>_v<migration>.sql`.

A migration loads the versions it deploys (and, to reverse, the ones before), so the text that runs in PostgreSQL
has one source. A change to a function is a new file named after its migration, and `diff` shows what changed.
`tests/labeling/test_sql_files.py` compares the functions deployed in the database with the newest files.
"""

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
# The "live slot" rule: an assignment occupies one of its task's slots while it is submitted, or leased and not yet
# expired. The queue's SQL writes it out in each query (so that the planner sees it); selectors.live_assignments
# is the same rule for the ORM. tests/labeling/test_sql_files.py holds every copy equal to this text.
LIVE_SLOT_RULE = "(a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))"
FUNCTIONS = {"task_refresh_slots": "labeling_task_refresh_slots", "lease_next": "labeling_lease_next"}


def read(name: str) -> str:
    """The text of one version, e.g. read("lease_next_v0017")."""
    return (DIRECTORY / f"{name}.sql").read_text()


def queue_functions(refresh_slots: str, lease_next: str) -> str:
    """The SQL that (re)creates both queue functions, as one migration runs it."""
    return "\n" + read(refresh_slots) + "\n" + read(lease_next)


def newest(function: str) -> str:
    """The file name (without .sql) of the newest version of `function` ("task_refresh_slots" or "lease_next")."""
    return sorted(path.stem for path in DIRECTORY.glob(f"{function}_v*.sql"))[-1]
