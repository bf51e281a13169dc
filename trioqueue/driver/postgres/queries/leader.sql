-- Leader election over the single-row tq_leader table. `now` and the expiry come from the
-- client's clock.

-- name: leader_attempt_elect
-- Take leadership if nobody holds it or the holder's term has expired, or extend our own
-- term. Returns a row only when $1 is the leader afterwards.
INSERT INTO tq_leader (name, leader_id, elected_at, expires_at)
VALUES ('default', $1, $2, $3)
ON CONFLICT (name) DO UPDATE
    SET leader_id = EXCLUDED.leader_id,
        elected_at = CASE WHEN tq_leader.leader_id = EXCLUDED.leader_id
                          THEN tq_leader.elected_at ELSE EXCLUDED.elected_at END,
        expires_at = EXCLUDED.expires_at
    WHERE tq_leader.expires_at < $2 OR tq_leader.leader_id = $1
RETURNING leader_id;

-- name: leader_resign
-- Give leadership up (if we hold it) and tell the followers, so one takes over at once.
WITH resigned AS (
    DELETE FROM tq_leader WHERE leader_id = $1 RETURNING leader_id
)
SELECT count(pg_notify('tq_leadership',
                       json_build_object('action', 'resigned', 'leader_id', leader_id)::text))
FROM resigned;

-- name: leader_get
SELECT leader_id, elected_at, expires_at FROM tq_leader WHERE name = 'default';
