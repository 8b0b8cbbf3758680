"""Upkeep of the queue's tables (VACUUM and ANALYZE), run by beat."""

from django.db import connection

# The tables every next-task call reads and writes.
QUEUE_TABLES = ("labeling_task", "labeling_assignment")


def queue_tables_vacuum(*, min_dead_rows: int = 1000, analyze_fraction: float = 0.1) -> list[str]:
    """VACUUM each queue table holding at least `min_dead_rows` dead rows, and ANALYZE each one whose rows changed
    by more than `analyze_fraction` of it (and at least `min_dead_rows`) since its last analysis. Returns the
    tables vacuumed or analysed. Every lease that takes a task's last slot leaves a dead entry at the front of the
    queue's index, where each next-task call starts reading; docs/architecture.md has why and the costs.
    """
    if connection.in_atomic_block:
        raise RuntimeError("VACUUM cannot run inside a transaction: call queue_tables_vacuum() outside atomic()")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, n_dead_tup >= %s, n_mod_since_analyze >= greatest(%s, %s * n_live_tup)"
            " FROM pg_stat_user_tables WHERE relname = ANY (%s) ORDER BY relname",
            [min_dead_rows, min_dead_rows, analyze_fraction, list(QUEUE_TABLES)],
        )
        due = [(name, vacuum, analyze) for name, vacuum, analyze in cursor.fetchall() if vacuum or analyze]
        for name, vacuum, analyze in due:
            table = connection.ops.quote_name(name)
            # SKIP_LOCKED: a vacuum still running from the last time is left to finish rather than waited for.
            if vacuum:
                cursor.execute(f"VACUUM ({'ANALYZE, ' if analyze else ''}SKIP_LOCKED) {table}")
            else:
                cursor.execute(f"ANALYZE (SKIP_LOCKED) {table}")
    return [name for name, _, _ in due]
