CREATE OR REPLACE FUNCTION labeling_task_refresh_slots(p_task bigint, p_now timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET enable_seqscan = off AS $$
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
