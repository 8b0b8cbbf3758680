"""The queue's scans skip busy tasks, and labeling_lease_next() keeps its plans (migration 0008 explains the rules,
which are unchanged).

Measured on 20,000 open tasks with 1,000 of them fully leased (labelers who took a task and left), one call took
4.4 ms of PostgreSQL time, most of it not spent on the rows:
- plpgsql planned the big window query again at nearly every call (a custom plan per call), because the generic
  plan it compared against cost more than JIT's threshold: when it was used, JIT compilation took 55 ms. The
  function now runs with `jit = off` and `plan_cache_mode = force_generic_plan`; its queries are written so that
  their generic plans are the index walks the custom plans were.
- "not a reply to the labeler's own message" was an EXISTS that the generic plan turned into a scan of every
  message of the author (all of them, when one author wrote the prompts); it is now a lookup by primary key.
- labeling_task_refresh_slots() was a LANGUAGE sql function, which PostgreSQL plans at every call; it is plpgsql.
  After a lease the function no longer calls it: the count under the row lock already says whether the lease
  took the last slot, and only then is the task marked busy (a task with a slot left is not updated at all).
- the index walks read past every fully leased task (they stay open until their leases end), so a call cost more
  with every abandoned lease. Open tasks that may have a free slot now have their own partial index; a busy task
  whose time has come (free_slots_from <= now, from a second index) is put back among them by the next call.
- a labeler's live lease was looked up by walking every live lease; it has its own index.
"""

from django.db import migrations, models

# Open tasks of kind v_kind that may have a free slot: those not marked busy (see "busy until" below).
FREE = """t.status = 'open' AND t.kind = v_kind AND t.free_slots_from IS NULL"""

# Whether task `t` is open to the labeler p_user at p_now (as in 0008; the message checks are primary-key lookups).
AVAILABLE = """(
       t.submitted_count < t.overlap
       AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
       AND NOT EXISTS (
           SELECT 1 FROM labeling_assignment a
           WHERE a.task_id = t.id AND a.labeler_id = p_user AND a.status <> 'expired')
       AND NOT EXISTS (
           SELECT 1 FROM labeling_taskcandidate c JOIN labeling_message m ON m.id = c.message_id
           WHERE c.task_id = t.id AND m.author_id = p_user)
       AND (t.kind NOT IN ('write_assistant_reply', 'write_user_reply')
            OR (SELECT m.author_id FROM labeling_message m WHERE m.id = t.parent_message_id) IS DISTINCT FROM p_user)
       AND (SELECT m.author_id FROM labeling_message m WHERE m.id = t.target_message_id) IS DISTINCT FROM p_user
       AND (SELECT count(*) FROM labeling_assignment a
            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
)"""

WINDOW = 8

SCORE = """(t.priority * 1000000.0
       + least(extract(epoch FROM (p_now - t.created_at)) / 60.0, p_max_age)
       + CASE WHEN t.language = ANY (p_languages) THEN p_language_bonus ELSE 0 END
       + CASE WHEN t.tags::text[] && p_topics THEN p_topic_bonus ELSE 0 END)"""

LEASE_NEXT = r"""
CREATE OR REPLACE FUNCTION labeling_task_refresh_slots(p_task bigint, p_now timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE labeling_task t
       SET free_slots_from = CASE WHEN live.n >= t.overlap THEN live.first_expiry END  -- all submitted: done
      FROM (SELECT count(*) AS n,
                   min(a.lease_expires_at) FILTER (WHERE a.status = 'leased') AS first_expiry
              FROM labeling_assignment a
             WHERE a.task_id = p_task
               AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) live
     WHERE t.id = p_task;
END;
$$;

CREATE OR REPLACE FUNCTION labeling_lease_next(
    p_user integer,
    p_now timestamptz,
    p_kinds text[],
    p_weights float8[],
    p_draws float8[],
    p_lease_minutes integer,
    p_language_bonus float8,
    p_topic_bonus float8,
    p_max_age float8
) RETURNS bigint LANGUAGE plpgsql VOLATILE
SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    p_languages text[] := '{}';
    p_topics text[] := '{}';
    v_reviewer boolean := false;
    v_assignment bigint;
    v_kinds text[] := '{}';
    v_weights float8[] := '{}';
    v_total float8;
    v_pick float8;
    v_kind text;
    v_index integer;
    v_draw integer := 0;
    v_task bigint;
    v_ids bigint[];
    v_overlap integer;
    v_taken integer;
    v_tried bigint[] := '{}';
    v_pass integer;
    v_round integer;
    v_best_language boolean;
    v_best_topic boolean;
BEGIN
    -- A lease is soft state: if the server crashed before it reached the disk, the labeler would just be given
    -- a task again. Not waiting for the WAL flush at commit halves the cost of a call. Submissions, which are
    -- the labelers' work, keep the durable default.
    PERFORM set_config('synchronous_commit', 'off', true);

    SELECT a.id INTO v_assignment FROM labeling_assignment a
    WHERE a.labeler_id = p_user AND a.status = 'leased' AND a.lease_expires_at > p_now
    ORDER BY a.leased_at DESC LIMIT 1;
    IF FOUND THEN
        RETURN v_assignment;
    END IF;

    -- Tasks marked busy until a lease ends (free_slots_from) whose time has come may have a free slot again: they
    -- go back among the free ones (NULL: "may have a slot"; the count under the row lock decides). So the scans
    -- below read one partial index of the free tasks and never walk past busy ones. Rows another caller holds
    -- are left for the next call.
    UPDATE labeling_task SET free_slots_from = NULL
     WHERE id IN (SELECT t.id FROM labeling_task t
                   WHERE t.status = 'open' AND t.free_slots_from IS NOT NULL AND t.free_slots_from <= p_now
                   ORDER BY t.free_slots_from LIMIT 100 FOR UPDATE SKIP LOCKED);

    -- The labeler's routing profile; reviewing is for reviewers and staff.
    SELECT coalesce(p.languages::text[], '{}'), coalesce(p.topics::text[], '{}'), coalesce(p.is_reviewer, false) OR u.is_staff
      INTO p_languages, p_topics, v_reviewer
      FROM auth_user u LEFT JOIN labeling_labelerprofile p ON p.user_id = u.id
     WHERE u.id = p_user;

    -- Kinds with open tasks that have a free slot. A kind whose tasks all turn out unavailable to this labeler
    -- is dropped below and the draw repeated among the rest, which gives the same mix as drawing only among
    -- the kinds with work for them, for the price of a cheap index probe per kind.
    FOR v_index IN 1 .. coalesce(array_length(p_kinds, 1), 0) LOOP
        CONTINUE WHEN p_weights[v_index] <= 0;
        CONTINUE WHEN p_kinds[v_index] = 'review_demonstration' AND NOT v_reviewer;
        v_kind := p_kinds[v_index];  -- a plain variable, so that a cached generic plan still uses the index
        -- Ordered like the queue's index, so that every plan walks that index and stops at the first match.
        PERFORM 1 FROM labeling_task t
         WHERE {free} AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
         ORDER BY t.priority DESC, t.created_at, t.id LIMIT 1;
        IF FOUND THEN
            v_kinds := v_kinds || v_kind;
            v_weights := v_weights || p_weights[v_index];
        END IF;
    END LOOP;

    WHILE coalesce(array_length(v_kinds, 1), 0) > 0 LOOP
        v_draw := v_draw + 1;
        SELECT sum(w) INTO v_total FROM unnest(v_weights) AS w;
        v_pick := coalesce(p_draws[1 + (v_draw - 1) % greatest(array_length(p_draws, 1), 1)], random()) * v_total;
        v_index := 1;
        WHILE v_index < array_length(v_kinds, 1) AND v_pick >= v_weights[v_index] LOOP
            v_pick := v_pick - v_weights[v_index];
            v_index := v_index + 1;
        END LOOP;
        v_kind := v_kinds[v_index];

        -- Concurrent callers may take every task of a window first; then the next window is read, a few times.
        FOR v_round IN 1 .. 4 LOOP
            -- The candidates, best first: the first rows of the index-ordered window (priority, then age), scored.
            -- A task matching the labeler's languages or topics may beat older ones; only when the best of this
            -- window lacks such a bonus are the first rows of the matching windows added and everything rescored.
            SELECT coalesce(array_agg(w.id ORDER BY w.score DESC, w.created_at, w.id), '{}'),
                   coalesce(bool_or(w.first AND w.language_match), false),
                   coalesce(bool_or(w.first AND w.topic_match), false)
              INTO v_ids, v_best_language, v_best_topic
              FROM (SELECT x.*, x.score = max(x.score) OVER () AS first FROM (
                      SELECT t.id, t.created_at, {score} AS score,
                             t.language = ANY (p_languages) AS language_match,
                             t.tags::text[] && p_topics AS topic_match
                        FROM labeling_task t
                       WHERE {free} AND t.id <> ALL (v_tried)
                         AND {available}
                       ORDER BY t.priority DESC, t.created_at, t.id LIMIT {window}) x) w;
            IF (cardinality(p_languages) > 0 AND NOT v_best_language) OR (cardinality(p_topics) > 0 AND NOT v_best_topic)
            THEN
                IF cardinality(p_languages) > 0 THEN
                    v_ids := v_ids || ARRAY(
                        SELECT t.id FROM labeling_task t
                        WHERE {free} AND t.language = ANY (p_languages) AND t.id <> ALL (v_tried)
                          AND {available}
                        ORDER BY t.priority DESC, t.created_at, t.id LIMIT {window});
                END IF;
                IF cardinality(p_topics) > 0 THEN
                    v_ids := v_ids || ARRAY(
                        SELECT t.id FROM labeling_task t
                        WHERE {free} AND t.tags::text[] && p_topics AND t.id <> ALL (v_tried)
                          AND {available}
                        ORDER BY t.priority DESC, t.created_at, t.id LIMIT {window});
                END IF;
                SELECT coalesce(array_agg(t.id ORDER BY {score} DESC, t.created_at, t.id), '{}')
                  INTO v_ids
                  FROM labeling_task t WHERE t.id = ANY (v_ids);
            END IF;

            -- Best first. The first pass skips rows another caller is locking, so concurrent callers spread over
            -- different tasks; the second pass waits for those locks, for a slot another caller leaves free.
            FOR v_pass IN 1 .. 2 LOOP
                FOREACH v_task IN ARRAY v_ids LOOP
                    CONTINUE WHEN v_task = ANY (v_tried);
                    -- A block with an exception handler is a subtransaction: raising 'full' rolls it back, which
                    -- releases the row lock at once. A caller thus holds at most one task lock while it waits for
                    -- another, and two callers cannot deadlock.
                    BEGIN
                        IF v_pass = 1 THEN
                            SELECT t.overlap INTO v_overlap FROM labeling_task t
                            WHERE t.id = v_task AND t.status = 'open' FOR UPDATE SKIP LOCKED;
                        ELSE
                            SELECT t.overlap INTO v_overlap FROM labeling_task t
                            WHERE t.id = v_task AND t.status = 'open' FOR UPDATE;
                        END IF;
                        IF FOUND THEN
                            v_tried := v_tried || v_task;
                            -- A new statement under the row lock: every lease committed before ours is visible.
                            SELECT count(*) INTO v_taken FROM labeling_assignment a
                            WHERE a.task_id = v_task
                              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now));
                            IF v_taken >= v_overlap THEN
                                RAISE EXCEPTION 'full' USING ERRCODE = 'FL001';
                            END IF;
                            UPDATE labeling_assignment
                               SET status = 'leased', leased_at = p_now,
                                   lease_expires_at = p_now + make_interval(mins => p_lease_minutes)
                             WHERE task_id = v_task AND labeler_id = p_user AND status = 'expired'
                            RETURNING id INTO v_assignment;
                            IF v_assignment IS NULL THEN
                                INSERT INTO labeling_assignment (task_id, labeler_id, status, leased_at, lease_expires_at,
                                                                 skip_reason, report_reason, draft)
                                VALUES (v_task, p_user, 'leased', p_now, p_now + make_interval(mins => p_lease_minutes),
                                        '', '', '')
                                ON CONFLICT (task_id, labeler_id) DO NOTHING
                                RETURNING id INTO v_assignment;
                            END IF;
                            IF v_assignment IS NOT NULL THEN
                                -- The task was found among the free ones (free_slots_from NULL) and we hold its row
                                -- lock. With a slot left it stays so: no update. If our lease took the last slot,
                                -- the task is busy until the first live lease ends.
                                IF v_taken + 1 >= v_overlap THEN
                                    UPDATE labeling_task t SET free_slots_from = (
                                        SELECT min(a.lease_expires_at) FROM labeling_assignment a
                                         WHERE a.task_id = v_task AND a.status = 'leased' AND a.lease_expires_at > p_now)
                                     WHERE t.id = v_task;
                                END IF;
                                RETURN v_assignment;
                            END IF;
                            RAISE EXCEPTION 'taken' USING ERRCODE = 'FL001';
                        END IF;
                    EXCEPTION WHEN SQLSTATE 'FL001' THEN
                        NULL;
                    END;
                END LOOP;
            END LOOP;
            EXIT WHEN cardinality(v_ids) = 0;
        END LOOP;

        v_kinds := v_kinds[1:v_index - 1] || v_kinds[v_index + 1:];
        v_weights := v_weights[1:v_index - 1] || v_weights[v_index + 1:];
    END LOOP;
    RETURN NULL;
END;
$$;
"""


def lease_next_sql() -> str:
    return (
        LEASE_NEXT.replace("{free}", FREE)
        .replace("{available}", AVAILABLE)
        .replace("{score}", SCORE)
        .replace("{window}", str(WINDOW))
    )


def previous_sql() -> str:
    import importlib

    previous = importlib.import_module("labeling.migrations.0008_lease_next_function")
    return previous.Migration.operations[0].sql


class Migration(migrations.Migration):
    dependencies = [("labeling", "0010_import_jobs")]

    operations = [
        # Replaced by task_open_free_queue_order: no query reads it any more, and every task write kept it up to date.
        migrations.RemoveIndex(model_name="task", name="task_open_queue_order"),
        migrations.AddIndex(
            model_name="assignment",
            index=models.Index(
                condition=models.Q(("status", "leased")), fields=["labeler", "-leased_at"], name="assignment_leased_by"
            ),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("free_slots_from__isnull", True), ("status", "open")),
                fields=["kind", "-priority", "created_at", "id"],
                name="task_open_free_queue_order",
            ),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("free_slots_from__isnull", False), ("status", "open")),
                fields=["free_slots_from"],
                name="task_open_busy_until",
            ),
        ),
        migrations.RunSQL(sql=lease_next_sql(), reverse_sql=previous_sql()),
    ]
