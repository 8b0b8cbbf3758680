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
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    p_languages text[] := '{}';
    p_topics text[] := '{}';
    v_reviewer boolean := false;
    v_assignment bigint;
    v_kinds text[] := '{}';
    v_weights float8[] := '{}';
    v_total float8;
    v_weight float8;
    v_pick float8;
    v_kind text;
    v_index integer;
    v_draw integer := 0;
    v_task bigint;
    v_ids bigint[];
    v_overlap integer;
    v_taken integer;
    v_first_expiry timestamptz;
    v_seen bigint[];
    v_locked bigint[];
    v_waiting boolean;
    v_round integer;
    v_best_language boolean;
    v_best_topic boolean;
    v_due boolean;
    v_ignored text;
    v_last_conversation bigint;
BEGIN
    -- A lease is soft state: if the server crashed before it reached the disk, the labeler would just be given
    -- a task again. Not waiting for the WAL flush at commit halves the cost of a call. Submissions, which are
    -- the labelers' work, keep the durable default.
    v_ignored := set_config('synchronous_commit', 'off', true);

    SELECT a.id INTO v_assignment FROM labeling_assignment a
    WHERE a.labeler_id = p_user AND a.status = 'leased' AND a.lease_expires_at > p_now
    ORDER BY a.leased_at DESC LIMIT 1;
    IF FOUND THEN
        RETURN v_assignment;
    END IF;

    -- The labeler's routing profile; reviewing is for reviewers and staff. And whether any task marked busy
    -- until a lease ends (free_slots_from) has seen that time come.
    -- And the conversation of their last submission: the first window passes over its tasks, so a labeler's work
    -- spreads over conversations; later windows take them when nothing else is free.
    SELECT coalesce(p.languages::text[], '{}'), coalesce(p.topics::text[], '{}'), coalesce(p.is_reviewer, false) OR u.is_staff,
           EXISTS (SELECT 1 FROM labeling_task t
                    WHERE t.status = 'open' AND t.free_slots_from IS NOT NULL AND t.free_slots_from <= p_now),
           p.last_conversation_id
      INTO p_languages, p_topics, v_reviewer, v_due, v_last_conversation
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

    -- A kind is drawn by weight among those. One whose tasks all turn out unavailable to this labeler is dropped
    -- and the draw repeated among the rest, which gives the same mix as drawing only among the kinds with work
    -- for them.
    WHILE coalesce(array_length(v_kinds, 1), 0) > 0 LOOP
        v_draw := v_draw + 1;
        v_total := 0;
        FOREACH v_weight IN ARRAY v_weights LOOP  -- plpgsql arithmetic: no query to start
            v_total := v_total + v_weight;
        END LOOP;
        v_pick := coalesce(p_draws[1 + (v_draw - 1) % greatest(array_length(p_draws, 1), 1)], random()) * v_total;
        v_index := 1;
        WHILE v_index < array_length(v_kinds, 1) AND v_pick >= v_weights[v_index] LOOP
            v_pick := v_pick - v_weights[v_index];
            v_index := v_index + 1;
        END LOOP;
        v_kind := v_kinds[v_index];

        -- Up to four windows are read, each after the rows of the last; a row that another caller is locking is
        -- passed over, so concurrent callers spread over different tasks instead of queueing for the best one.
        -- When no unlocked candidate is left, the rows passed over are waited for, best first: a task with
        -- overlap 2 may still have a slot once the other caller commits.
        v_seen := '{}';
        v_locked := '{}';
        v_waiting := false;
        FOR v_round IN 1 .. 5 LOOP
            IF v_round <= 4 THEN
                -- The candidates, best first: the first rows of the index-ordered window (priority, then age),
                -- scored. A task matching the labeler's languages or topics may beat older ones; only when the
                -- best of this window lacks such a bonus are the first rows of the matching windows added and
                -- everything rescored.
                SELECT coalesce(array_agg(w.id ORDER BY w.score DESC, w.created_at, w.id), '{}'),
                       coalesce(bool_or(w.first AND w.language_match), false),
                       coalesce(bool_or(w.first AND w.topic_match), false)
                  INTO v_ids, v_best_language, v_best_topic
                  FROM (SELECT x.*, x.score = max(x.score) OVER () AS first FROM (
                          SELECT t.id, t.created_at, (t.priority * 1000000.0
       + least(extract(epoch FROM (p_now - t.created_at)) / 60.0, p_max_age)
       + CASE WHEN t.language = ANY (p_languages) THEN p_language_bonus ELSE 0 END
       + CASE WHEN t.tags::text[] && p_topics THEN p_topic_bonus ELSE 0 END) AS score,
                                 t.language = ANY (p_languages) AS language_match,
                                 t.tags::text[] && p_topics AS topic_match
                            FROM labeling_task t
                           WHERE t.status = 'open' AND t.kind = v_kind AND t.free_slots_from IS NULL AND t.id <> ALL (v_seen)
                             AND (v_round > 1 OR v_last_conversation IS NULL OR t.conversation_id IS DISTINCT FROM v_last_conversation)
                             AND (
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
)
                           ORDER BY t.priority DESC, t.created_at, t.id LIMIT 8) x) w;
                IF (cardinality(p_languages) > 0 AND NOT v_best_language)
                   OR (cardinality(p_topics) > 0 AND NOT v_best_topic) THEN
                    IF cardinality(p_languages) > 0 THEN
                        v_ids := v_ids || ARRAY(
                            SELECT t.id FROM labeling_task t
                            WHERE t.status = 'open' AND t.kind = v_kind AND t.free_slots_from IS NULL AND t.language = ANY (p_languages) AND t.id <> ALL (v_seen)
                             AND (v_round > 1 OR v_last_conversation IS NULL OR t.conversation_id IS DISTINCT FROM v_last_conversation)
                              AND (
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
)
                            ORDER BY t.priority DESC, t.created_at, t.id LIMIT 8);
                    END IF;
                    IF cardinality(p_topics) > 0 THEN
                        v_ids := v_ids || ARRAY(
                            SELECT t.id FROM labeling_task t
                            WHERE t.status = 'open' AND t.kind = v_kind AND t.free_slots_from IS NULL AND t.tags::text[] && p_topics AND t.id <> ALL (v_seen)
                             AND (v_round > 1 OR v_last_conversation IS NULL OR t.conversation_id IS DISTINCT FROM v_last_conversation)
                              AND (
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
)
                            ORDER BY t.priority DESC, t.created_at, t.id LIMIT 8);
                    END IF;
                    SELECT coalesce(array_agg(t.id ORDER BY (t.priority * 1000000.0
       + least(extract(epoch FROM (p_now - t.created_at)) / 60.0, p_max_age)
       + CASE WHEN t.language = ANY (p_languages) THEN p_language_bonus ELSE 0 END
       + CASE WHEN t.tags::text[] && p_topics THEN p_topic_bonus ELSE 0 END) DESC, t.created_at, t.id), '{}')
                      INTO v_ids
                      FROM labeling_task t WHERE t.id = ANY (v_ids);
                END IF;
                v_seen := v_seen || v_ids;
            END IF;
            -- (A first window left empty by passing over the last conversation is not the end: read on.)
            IF v_round = 5 OR (cardinality(v_ids) = 0 AND (v_round > 1 OR v_last_conversation IS NULL)) THEN
                v_waiting := true;
                v_ids := v_locked;
            END IF;

            FOREACH v_task IN ARRAY v_ids LOOP
                -- A block with an exception handler is a subtransaction: raising 'full' rolls it back, which
                -- releases the row lock at once. A caller thus holds no lock on a free task while it waits for
                -- another (only on the busy tasks it put back above, which other callers do not wait for), and
                -- two callers cannot deadlock.
                BEGIN
                    IF v_waiting THEN
                        SELECT t.overlap INTO v_overlap FROM labeling_task t
                        WHERE t.id = v_task AND t.status = 'open' FOR UPDATE;
                    ELSE
                        SELECT t.overlap INTO v_overlap FROM labeling_task t
                        WHERE t.id = v_task AND t.status = 'open' FOR UPDATE SKIP LOCKED;
                    END IF;
                    IF NOT FOUND THEN
                        -- Locked by another caller (or no longer open, which the wait will find).
                        IF NOT v_waiting THEN
                            v_locked := v_locked || v_task;
                        END IF;
                    ELSE
                        -- A new statement under the row lock: every lease committed before ours is visible.
                        SELECT count(*), min(a.lease_expires_at) FILTER (WHERE a.status = 'leased')
                          INTO v_taken, v_first_expiry
                          FROM labeling_assignment a
                         WHERE a.task_id = v_task
                           AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now));
                        IF v_taken >= v_overlap THEN
                            RAISE EXCEPTION 'full' USING ERRCODE = 'FL001';
                        END IF;
                        -- A new lease, or the labeler's own expired one taken up again.
                        INSERT INTO labeling_assignment AS a (task_id, labeler_id, status, leased_at, lease_expires_at,
                                                              skip_reason, report_reason, draft)
                        VALUES (v_task, p_user, 'leased', p_now, p_now + make_interval(mins => p_lease_minutes),
                                '', '', '')
                        ON CONFLICT (task_id, labeler_id) DO UPDATE
                           SET status = 'leased', leased_at = excluded.leased_at,
                               lease_expires_at = excluded.lease_expires_at
                         WHERE a.status = 'expired'
                        RETURNING a.id INTO v_assignment;
                        IF v_assignment IS NULL THEN
                            RAISE EXCEPTION 'taken' USING ERRCODE = 'FL001';
                        END IF;
                        -- The task was found among the free ones (free_slots_from NULL) and we hold its row lock.
                        -- With a slot left it stays so: no update. If our lease took the last slot, the task is
                        -- busy until the first live lease ends (least() skips a NULL: no other live lease).
                        IF v_taken + 1 >= v_overlap THEN
                            UPDATE labeling_task SET free_slots_from = least(
                                v_first_expiry, p_now + make_interval(mins => p_lease_minutes))
                             WHERE id = v_task;
                        END IF;
                        RETURN v_assignment;
                    END IF;
                EXCEPTION WHEN SQLSTATE 'FL001' THEN
                    NULL;
                END;
            END LOOP;
            EXIT WHEN v_waiting;
        END LOOP;

        v_kinds := v_kinds[1:v_index - 1] || v_kinds[v_index + 1:];
        v_weights := v_weights[1:v_index - 1] || v_weights[v_index + 1:];
    END LOOP;
    RETURN NULL;
END;
$$;
