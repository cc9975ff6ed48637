-- 0002_cluster: the leases through which several daemons split the markets
-- (docs/cluster.md). Unused, and empty, while one daemon runs alone
-- (feed.cluster = false).

-- One row per running clustered daemon, refreshed every feed.cluster_lease_ttl / 3 s.
-- backend_pid is the server process of its lease connection: when that session ends
-- (the daemon was killed, its host lost the connection), the member is dead at once.
CREATE TABLE cluster_members (
    member_id     text PRIMARY KEY,             -- '<host>:<pid>:<random>'
    host          text NOT NULL,
    pid           int NOT NULL,
    backend_pid   int NOT NULL,
    health        text,                         -- its /health URL, for `polystream status`
    leaving       boolean NOT NULL DEFAULT false,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per partition of the markets (feed.cluster_partitions of them). A daemon
-- writes a market's rows only while it holds its partition's lease (owner, not
-- expired), checked and share-locked in the writing transaction itself.
CREATE TABLE cluster_leases (
    partition   int PRIMARY KEY CHECK (partition >= 0),
    owner       text,                           -- a cluster_members.member_id, or NULL
    epoch       bigint NOT NULL DEFAULT 0,      -- +1 at each change of owner
    expires_at  timestamptz,
    taken_at    timestamptz
);
