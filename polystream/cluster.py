"""
Scale-out: several daemons on one database split the markets between them,
with PostgreSQL as the only coordinator (docs/cluster.md).

The desired markets are cut into ``feed.cluster_partitions`` partitions
(:func:`partition_of`: CRC-32 of the market key, the same in every process
and on every host). Each partition has one lease row in ``cluster_leases``;
a daemon subscribes to, prices and monitors only the markets of the
partitions it holds. Every ``feed.cluster_lease_ttl / 3`` seconds each daemon
runs one :func:`cycle` transaction:

* it refreshes its ``cluster_members`` row and renews its leases
  (``expires_at = now() + ttl``, the server's clock: no clock of ours counts);
* it counts the live members (heartbeat within the TTL **and** its lease
  session still on the server: a killed daemon's session ends with its
  process, so it is dead at once, not one TTL later), and keeps
  ``ceil(partitions / live)`` partitions: it gives back the excess and
  takes free ones (no owner, expired, or owned by a dead member), lowest
  first, ``FOR UPDATE SKIP LOCKED`` so that two daemons never take the same.

A daemon that stops cleanly hands its partitions straight to the live members
(:func:`hand_over`): they are never unowned. One that cannot renew stops
using its leases before they expire (:class:`Cluster` keeps a local deadline
a margin short of the server's). And a write of prices is fenced: the
writing transaction first share-locks the caller's unexpired leases
(:meth:`Fence.held`) and writes only the markets of those partitions, so a
lease cannot change owner while a write under it is open (the taker's
``UPDATE`` waits for the lock), and an owner that lost it writes nothing.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import psycopg
import structlog
import trio

from polystream.errors import DatabaseError
from polystream.stats import Stats
from polystream.store.link import DbLink

__all__ = [
    "Cluster",
    "ClusterView",
    "Fence",
    "Member",
    "cycle",
    "hand_over",
    "new_member_id",
    "partition_of",
    "read_cluster",
]

logger = structlog.get_logger(__name__)


def partition_of(key: str, partitions: int) -> int:
    """
    The partition of market key ``key`` (a market id, or a bare token id)
    among ``partitions``: CRC-32 of its UTF-8 bytes modulo ``partitions``.
    Stable across processes, hosts and Python versions (``hash()`` is not).
    """
    return zlib.crc32(key.encode()) % partitions


def new_member_id() -> str:
    """A member id for this process: ``<host>:<pid>:<6 random hex>`` (unique if a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


# ------------------------------------------------------------------ SQL

_LIVE = """
    NOT m.leaving AND m.heartbeat_at > now() - make_interval(secs => %(ttl)s)
    AND EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = m.backend_pid)
"""

_JOIN = """
INSERT INTO cluster_members (member_id, host, pid, backend_pid, health, leaving)
VALUES (%(me)s, %(host)s, %(pid)s, pg_backend_pid(), %(health)s, %(leaving)s)
ON CONFLICT (member_id) DO UPDATE SET
    backend_pid = pg_backend_pid(), health = EXCLUDED.health,
    leaving = EXCLUDED.leaving, heartbeat_at = now()
"""

_PARTITIONS = """
INSERT INTO cluster_leases (partition)
SELECT g FROM generate_series(0, %(partitions)s - 1) AS g
ON CONFLICT (partition) DO NOTHING
"""

_LIVE_COUNT = f"SELECT count(*) FROM cluster_members AS m WHERE {_LIVE}"

# A member silent for ten TTLs is gone for good (killed, host lost): its row goes.
_FORGET = """
DELETE FROM cluster_members
WHERE member_id <> %(me)s AND heartbeat_at < now() - make_interval(secs => 10 * %(ttl)s)
"""

_RENEW = """
UPDATE cluster_leases SET expires_at = now() + make_interval(secs => %(ttl)s)
WHERE owner = %(me)s AND partition < %(partitions)s
RETURNING partition, epoch
"""

_GIVE_BACK = """
UPDATE cluster_leases SET owner = NULL, expires_at = NULL
WHERE owner = %(me)s AND (partition = ANY(%(excess)s) OR partition >= %(partitions)s)
"""

_TAKE = f"""
UPDATE cluster_leases AS l SET
    owner = %(me)s, epoch = l.epoch + 1,
    expires_at = now() + make_interval(secs => %(ttl)s), taken_at = now()
WHERE l.partition IN (
    SELECT f.partition FROM cluster_leases AS f
    WHERE f.partition < %(partitions)s AND f.owner IS DISTINCT FROM %(me)s
      AND (f.owner IS NULL OR f.expires_at IS NULL OR f.expires_at < now()
           OR NOT EXISTS (SELECT 1 FROM cluster_members AS m
                          WHERE m.member_id = f.owner AND {_LIVE.replace("NOT m.leaving AND", "")}))
    ORDER BY f.partition LIMIT %(want)s
    FOR UPDATE SKIP LOCKED)
RETURNING l.partition, l.epoch
"""

_HAND_OVER = f"""
WITH peers AS (
    SELECT member_id, row_number() OVER (ORDER BY member_id) - 1 AS n, count(*) OVER () AS k
    FROM cluster_members AS m WHERE m.member_id <> %(me)s AND {_LIVE}
), mine AS (
    SELECT partition, row_number() OVER (ORDER BY partition) - 1 AS n
    FROM cluster_leases WHERE owner = %(me)s
)
UPDATE cluster_leases AS l SET
    owner = p.member_id, epoch = l.epoch + 1,
    expires_at = now() + make_interval(secs => %(ttl)s), taken_at = now()
FROM mine, peers AS p
WHERE l.partition = mine.partition AND p.n = mine.n %% p.k
RETURNING l.partition, p.member_id
"""

_RELEASE = "UPDATE cluster_leases SET owner = NULL, expires_at = NULL WHERE owner = %(me)s"
_LEAVE = "DELETE FROM cluster_members WHERE member_id = %(me)s"

_HELD = """
SELECT partition FROM cluster_leases
WHERE owner = %(me)s AND expires_at > now()
FOR SHARE
"""


@attrs.frozen
class Member:
    """
    Who this daemon is in the cluster: ``member_id`` (see
    :func:`new_member_id`), its host and pid, its ``/health`` URL (or None),
    and the cluster's shape: ``partitions`` and the lease ``ttl`` (seconds).
    """

    member_id: str
    host: str
    pid: int
    partitions: int
    ttl: float
    health: str | None = None

    def params(self, **more: Any) -> dict[str, Any]:
        """The SQL parameters naming this member."""
        return {
            "me": self.member_id,
            "host": self.host,
            "pid": self.pid,
            "health": self.health,
            "partitions": self.partitions,
            "ttl": self.ttl,
            **more,
        }


def cycle(
    conn: psycopg.Connection[Any], member: Member, held: Iterable[int], leaving: bool = False
) -> tuple[dict[int, int], int]:
    """
    One membership round in the caller's transaction (``DbLink.call``): refresh
    the member row, renew this member's leases, give back what is beyond its
    fair share (``ceil(partitions / live members)``; 0 when ``leaving``), take
    free partitions up to it. ``held``: the partitions the caller believes it
    holds (to give back the highest first).

    Returns:
        ``({partition: epoch} now held, live members)``.
    """
    params = member.params(leaving=leaving)
    conn.execute(_JOIN, params)
    conn.execute(_PARTITIONS, params)
    conn.execute(_FORGET, params)
    row = conn.execute(_LIVE_COUNT, params).fetchone()
    live = max(1, int(row[0]) if row else 0)
    owned = {int(p): int(e) for p, e in conn.execute(_RENEW, params).fetchall()}
    share = 0 if leaving else math.ceil(member.partitions / live)
    if len(owned) > share:
        serving = set(held)
        order = sorted(owned, key=lambda p: (p not in serving, p))  # keep what we serve
        excess = sorted(order[share:]) if share else sorted(owned)
        conn.execute(_GIVE_BACK, member.params(excess=excess))
        for partition in excess:
            del owned[partition]
    elif len(owned) < share:
        taken = conn.execute(_TAKE, member.params(want=share - len(owned))).fetchall()
        owned.update({int(p): int(e) for p, e in taken})
    return owned, live


def hand_over(conn: psycopg.Connection[Any], member: Member) -> dict[int, str]:
    """
    At a clean stop: give each of this member's partitions straight to a live
    peer (round robin), so none is ever unowned; then release what is left
    (no peer) and delete the member row. Returns ``{partition: new owner}``.
    """
    given = {int(p): str(m) for p, m in conn.execute(_HAND_OVER, member.params()).fetchall()}
    conn.execute(_RELEASE, {"me": member.member_id})  # no live peer: free for whoever comes
    conn.execute(_LEAVE, {"me": member.member_id})
    return given


@attrs.frozen
class Fence:
    """
    What a price write checks in its own transaction: the partitions this
    member holds unexpired, share-locked until the write commits (see the
    module docstring). ``key_of`` maps a token id to its market key.
    """

    member_id: str
    partitions: int
    key_of: Callable[[str], str]

    def held(self, conn: psycopg.Connection[Any]) -> frozenset[int]:
        """The partitions held now, share-locked for the rest of the transaction."""
        return frozenset(int(r[0]) for r in conn.execute(_HELD, {"me": self.member_id}))

    def owns_market(self, held: frozenset[int], key: str) -> bool:
        """Whether market key ``key`` is in ``held``."""
        return partition_of(key, self.partitions) in held

    def owns_token(self, held: frozenset[int], token_id: str) -> bool:
        """Whether the market of ``token_id`` is in ``held``."""
        return partition_of(self.key_of(token_id), self.partitions) in held


# ------------------------------------------------------------------ the view


@attrs.frozen
class ClusterView:
    """
    The cluster as the database sees it (``polystream status``): ``members``
    as ``(member_id, health URL, alive, leaving, partitions held)``,
    ``partitions`` in all, and the ``unowned`` ones (no live, unexpired owner).
    """

    members: list[tuple[str, str | None, bool, bool, int]]
    partitions: int
    unowned: list[int]


def read_cluster(conn: psycopg.Connection[Any], ttl: float) -> ClusterView:
    """Read :class:`ClusterView` (``ttl``: the lease TTL, seconds, that makes a member live)."""
    members = conn.execute(
        f"""
        SELECT m.member_id, m.health, ({_LIVE}) AS alive, m.leaving,
               (SELECT count(*) FROM cluster_leases AS l
                WHERE l.owner = m.member_id AND l.expires_at > now())
        FROM cluster_members AS m ORDER BY m.member_id
        """,
        {"ttl": ttl},
    ).fetchall()
    leases = conn.execute(
        "SELECT partition, owner IS NOT NULL AND expires_at > now() FROM cluster_leases"
        " ORDER BY partition"
    ).fetchall()
    return ClusterView(
        members=[(str(a), b, bool(c), bool(d), int(e)) for a, b, c, d, e in members],
        partitions=len(leases),
        unowned=[int(p) for p, owned in leases if not owned],
    )


# ------------------------------------------------------------------ the task


@attrs.define(eq=False)
class Cluster:
    """
    The daemon's membership: runs :func:`cycle` every ``ttl / 3`` seconds on
    its own connection and keeps :attr:`owned` (partitions usable now). A
    partition stays usable until a margin (``ttl / 3``) before its lease would
    expire without a successful renewal: a daemon cut from PostgreSQL stops
    serving its markets before anyone else may take them. ``changed()`` is
    called whenever :attr:`owned` changes (the reconciler's ``wake``).
    """

    member: Member
    link: DbLink
    stats: Stats
    changed: Callable[[], None] = lambda: None
    owned: frozenset[int] = frozenset()
    live: int = 0
    _usable_until: float = 0.0  # time.monotonic()

    @property
    def interval(self) -> float:
        """Seconds between two cycles: a third of the TTL."""
        return self.member.ttl / 3

    def owns(self, key: str) -> bool:
        """Whether market key ``key`` (a market id or a bare token id) is served here now."""
        return partition_of(key, self.member.partitions) in self.owned

    def fence(self, key_of: Callable[[str], str]) -> Fence:
        """The write fence of this member (``key_of``: token id -> market key)."""
        return Fence(self.member.member_id, self.member.partitions, key_of)

    def _set(self, owned: dict[int, int]) -> None:
        new = frozenset(owned)
        if new != self.owned:
            logger.info(
                "cluster_partitions_changed",
                member=self.member.member_id,
                held=len(new),
                taken=sorted(new - self.owned)[:20],
                given=sorted(self.owned - new)[:20],
                members=self.live,
            )
            self.owned = new
            self.stats.cluster_partitions = len(new)
            self.changed()

    async def step(self, leaving: bool = False) -> None:
        """One cycle; on a database failure, keep the leases only until their margin."""
        started = time.monotonic()
        try:
            owned, self.live = await self.link.call(cycle, self.member, self.owned, leaving)
        except DatabaseError:
            if self.owned and time.monotonic() >= self._usable_until:
                logger.warning("cluster_leases_lapsed", member=self.member.member_id)
                self._set({})
            return
        self._usable_until = started + self.member.ttl - self.interval
        self.stats.cluster_members = self.live
        self._set(owned)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Cycle every :attr:`interval` until cancelled (the first before ``started``)."""
        await self.step()
        task_status.started()
        while True:
            deadline = time.monotonic() + self.interval
            if self.owned:  # a failing database: drop them on time, not one period late
                deadline = min(deadline, max(self._usable_until, time.monotonic()))
            await trio.sleep(max(0.0, deadline - time.monotonic()))
            await self.step()

    async def leave(self) -> None:
        """Hand every partition to the live peers and leave (a clean stop); never raises."""
        try:
            given = await self.link.call(hand_over, self.member)
        except DatabaseError:
            given = {}
        logger.info("cluster_left", member=self.member.member_id, handed_over=len(given))
        self._set({})
