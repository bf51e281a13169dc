-- trioqueue schema, version 1: jobs, queues, leadership.

CREATE TYPE tq_job_state AS ENUM (
    'available', 'cancelled', 'completed', 'discarded',
    'pending', 'retryable', 'running', 'scheduled'
);

CREATE TABLE tq_job (
    id            bigserial PRIMARY KEY,
    state         tq_job_state NOT NULL DEFAULT 'available',
    attempt       smallint NOT NULL DEFAULT 0,
    max_attempts  smallint NOT NULL,
    attempted_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finalized_at  timestamptz,
    scheduled_at  timestamptz NOT NULL DEFAULT now(),
    priority      smallint NOT NULL DEFAULT 1,
    args          jsonb NOT NULL,
    attempted_by  text[] NOT NULL DEFAULT '{}',
    errors        jsonb NOT NULL DEFAULT '[]',
    kind          text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    queue         text NOT NULL DEFAULT 'default',
    tags          varchar(255)[] NOT NULL DEFAULT '{}',
    unique_key    bytea,
    unique_states bit(8),
    CONSTRAINT tq_job_max_attempts_positive CHECK (max_attempts > 0),
    CONSTRAINT tq_job_priority_in_range CHECK (priority >= 1 AND priority <= 4),
    CONSTRAINT tq_job_kind_length CHECK (char_length(kind) > 0 AND char_length(kind) < 129),
    CONSTRAINT tq_job_queue_length CHECK (char_length(queue) > 0 AND char_length(queue) < 129),
    CONSTRAINT tq_job_errors_is_array CHECK (jsonb_typeof(errors) = 'array'),
    CONSTRAINT tq_job_finalized_or_finalized_at_null CHECK (
        (finalized_at IS NULL AND state NOT IN ('cancelled', 'completed', 'discarded'))
        OR (finalized_at IS NOT NULL AND state IN ('cancelled', 'completed', 'discarded'))
    )
);

-- The fetch query walks this index: one queue's available jobs in priority order.
CREATE INDEX tq_job_fetch_idx ON tq_job (state, queue, priority, scheduled_at, id);

-- The cleaner and the dashboard look for finalized jobs by age.
CREATE INDEX tq_job_state_finalized_at_idx ON tq_job (state, finalized_at)
    WHERE finalized_at IS NOT NULL;

CREATE INDEX tq_job_kind_idx ON tq_job (kind);

-- Is `state` one of the states in a unique_states bitmask? Bit 7 (the rightmost) is
-- available, then cancelled, completed, discarded, pending, retryable, running, and bit 0
-- (the leftmost) is scheduled.
CREATE FUNCTION tq_job_state_in_bitmask(bitmask bit(8), state tq_job_state)
RETURNS boolean
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE state
        WHEN 'available' THEN get_bit(bitmask, 7)
        WHEN 'cancelled' THEN get_bit(bitmask, 6)
        WHEN 'completed' THEN get_bit(bitmask, 5)
        WHEN 'discarded' THEN get_bit(bitmask, 4)
        WHEN 'pending'   THEN get_bit(bitmask, 3)
        WHEN 'retryable' THEN get_bit(bitmask, 2)
        WHEN 'running'   THEN get_bit(bitmask, 1)
        WHEN 'scheduled' THEN get_bit(bitmask, 0)
        ELSE 0
    END = 1;
$$;

-- At most one job per unique key among the jobs whose state is in their own bitmask.
CREATE UNIQUE INDEX tq_job_unique_idx ON tq_job (unique_key)
    WHERE unique_key IS NOT NULL
      AND unique_states IS NOT NULL
      AND tq_job_state_in_bitmask(unique_states, state);

CREATE TABLE tq_queue (
    name       text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    metadata   jsonb NOT NULL DEFAULT '{}',
    paused_at  timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tq_queue_name_length CHECK (char_length(name) > 0 AND char_length(name) < 129)
);

-- Leadership is soft state: losing it in a crash costs one election, so skip the WAL.
CREATE UNLOGGED TABLE tq_leader (
    name       text PRIMARY KEY DEFAULT 'default',
    leader_id  text NOT NULL,
    elected_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT tq_leader_name_default CHECK (name = 'default'),
    CONSTRAINT tq_leader_id_length CHECK (char_length(leader_id) > 0 AND char_length(leader_id) < 129)
);
