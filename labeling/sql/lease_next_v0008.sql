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
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
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
         WHERE t.status = 'open' AND t.kind = v_kind
           AND (t.free_slots_from IS NULL OR t.free_slots_from <= p_now)
           AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
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
                      SELECT t.id, t.created_at, (t.priority * 1000000.0
       + least(extract(epoch FROM (p_now - t.created_at)) / 60.0, p_max_age)
       + CASE WHEN t.language = ANY (p_languages) THEN p_language_bonus ELSE 0 END
       + CASE WHEN t.tags::text[] && p_topics THEN p_topic_bonus ELSE 0 END) AS score,
                             t.language = ANY (p_languages) AS language_match,
                             t.tags::text[] && p_topics AS topic_match
                        FROM labeling_task t
                       WHERE t.status = 'open' AND t.kind = v_kind
                         AND (t.free_slots_from IS NULL OR t.free_slots_from <= p_now) AND t.id <> ALL (v_tried)
                         AND (
       t.submitted_count < t.overlap
       AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
       AND NOT EXISTS (
           SELECT 1 FROM labeling_assignment a
           WHERE a.task_id = t.id AND a.labeler_id = p_user AND a.status <> 'expired')
       AND NOT EXISTS (
           SELECT 1 FROM labeling_taskcandidate c JOIN labeling_message m ON m.id = c.message_id
           WHERE c.task_id = t.id AND m.author_id = p_user)
       AND NOT (t.kind IN ('write_assistant_reply', 'write_user_reply') AND EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.parent_message_id AND m.author_id = p_user))
       AND NOT EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.target_message_id AND m.author_id = p_user)
       AND (SELECT count(*) FROM labeling_assignment a
            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
)
                       ORDER BY t.priority DESC, t.created_at, t.id LIMIT 8) x) w;
            IF (cardinality(p_languages) > 0 AND NOT v_best_language) OR (cardinality(p_topics) > 0 AND NOT v_best_topic)
            THEN
                IF cardinality(p_languages) > 0 THEN
                    v_ids := v_ids || ARRAY(
                        SELECT t.id FROM labeling_task t
                        WHERE t.status = 'open' AND t.kind = v_kind AND t.language = ANY (p_languages)
                          AND (t.free_slots_from IS NULL OR t.free_slots_from <= p_now) AND t.id <> ALL (v_tried)
                          AND (
       t.submitted_count < t.overlap
       AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
       AND NOT EXISTS (
           SELECT 1 FROM labeling_assignment a
           WHERE a.task_id = t.id AND a.labeler_id = p_user AND a.status <> 'expired')
       AND NOT EXISTS (
           SELECT 1 FROM labeling_taskcandidate c JOIN labeling_message m ON m.id = c.message_id
           WHERE c.task_id = t.id AND m.author_id = p_user)
       AND NOT (t.kind IN ('write_assistant_reply', 'write_user_reply') AND EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.parent_message_id AND m.author_id = p_user))
       AND NOT EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.target_message_id AND m.author_id = p_user)
       AND (SELECT count(*) FROM labeling_assignment a
            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
)
                        ORDER BY t.priority DESC, t.created_at, t.id LIMIT 8);
                END IF;
                IF cardinality(p_topics) > 0 THEN
                    v_ids := v_ids || ARRAY(
                        SELECT t.id FROM labeling_task t
                        WHERE t.status = 'open' AND t.kind = v_kind AND t.tags::text[] && p_topics
                          AND (t.free_slots_from IS NULL OR t.free_slots_from <= p_now) AND t.id <> ALL (v_tried)
                          AND (
       t.submitted_count < t.overlap
       AND (t.reserved_for_id IS NULL OR t.reserved_for_id = p_user)
       AND NOT EXISTS (
           SELECT 1 FROM labeling_assignment a
           WHERE a.task_id = t.id AND a.labeler_id = p_user AND a.status <> 'expired')
       AND NOT EXISTS (
           SELECT 1 FROM labeling_taskcandidate c JOIN labeling_message m ON m.id = c.message_id
           WHERE c.task_id = t.id AND m.author_id = p_user)
       AND NOT (t.kind IN ('write_assistant_reply', 'write_user_reply') AND EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.parent_message_id AND m.author_id = p_user))
       AND NOT EXISTS (
           SELECT 1 FROM labeling_message m WHERE m.id = t.target_message_id AND m.author_id = p_user)
       AND (SELECT count(*) FROM labeling_assignment a
            WHERE a.task_id = t.id
              AND (a.status = 'submitted' OR (a.status = 'leased' AND a.lease_expires_at > p_now))) < t.overlap
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
                                PERFORM labeling_task_refresh_slots(v_task, p_now);
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
