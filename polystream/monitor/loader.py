"""
Keeps the monitor's rules equal to the database: a full reload at start,
every ``monitor.reload_interval`` seconds and after LISTEN comes back; in
between, NOTIFY payloads reload only the rows that changed.
"""

from __future__ import annotations

import attrs
import orjson
import trio

from polystream.errors import DatabaseError
from polystream.memory import release_free_memory
from polystream.monitor.engine import Monitor
from polystream.monitor.rules import RuleSet, load_rules
from polystream.store.link import DbLink

__all__ = ["RuleLoader"]

_WATCHED = {"positions": "active", "predictions": "pending"}
"""The status under which a row has rules (``load_rules`` reads only those)."""


@attrs.define(eq=False)
class RuleLoader:
    """
    Keeps the monitor's rules equal to the database: a full reload at start,
    every ``interval`` seconds and after the LISTEN connection comes back; in
    between, NOTIFY payloads (``{"op", "id", ...}``) reload only the rows
    that changed, so a burst of triggers does not reload 100,000 rules.
    """

    link: DbLink
    monitor: Monitor
    interval: float = 30.0
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _full: bool = False
    _positions: set[int] = attrs.field(factory=set)
    _predictions: set[int] = attrs.field(factory=set)
    _gone: set[tuple[str, int]] = attrs.field(factory=set)  # ("positions"|"predictions", id)

    def wake(self) -> None:
        """Reload everything as soon as possible."""
        self._full = True
        self._wake.set()

    def notify(self, notes: list[tuple[str, str]] | None) -> None:
        """
        Notifications from ``polystream_positions``/``polystream_predictions``
        (``None``: reconnected, reload everything).
        """
        if notes is None:
            self.wake()
            return
        for channel, payload in notes:
            try:
                note = orjson.loads(payload)
                row_id = int(note["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._full = True
                continue
            table = "predictions" if channel.endswith("predictions") else "positions"
            ids = self._predictions if table == "predictions" else self._positions
            # A row that left its watched status has no rule any more: nothing to read
            # (a burst of triggers moves hundreds of positions to 'closing').
            if note.get("status") not in (_WATCHED[table], None) or note.get("op") == "DELETE":
                ids.discard(row_id)
                self._gone.add((table, row_id))
            else:
                ids.add(row_id)
                self._gone.discard((table, row_id))
        self._wake.set()

    async def _reload(self) -> None:
        if self._full:
            self._full = False
            self._positions.clear()
            self._predictions.clear()
            self._gone.clear()
            rules: RuleSet = await self.link.call(load_rules)
            await self.monitor.replace_all_in_slices(rules)
            del rules  # the old table is gone too: its pages go back to the OS
            await release_free_memory()
            return
        positions, self._positions = self._positions, set()
        predictions, self._predictions = self._predictions, set()
        gone, self._gone = self._gone, set()
        rules = RuleSet()
        if positions or predictions:
            try:
                rules = await self.link.call(load_rules, sorted(positions), sorted(predictions))
            except DatabaseError:
                self._positions |= positions
                self._predictions |= predictions
                self._gone |= gone
                raise
        for table, row_id in gone:
            (predictions if table == "predictions" else positions).add(row_id)
        self.monitor.apply_changes(positions, predictions, rules)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load now (before ``started``), then reload on notifications or interval."""
        self._full = True
        started = False
        while True:
            self._wake = trio.Event()
            try:
                await self._reload()
            except DatabaseError:
                self._full = True  # logged by the link; retried next round
            if not started:
                started = True
                task_status.started()
            with trio.move_on_after(self.interval) as scope:
                await self._wake.wait()
                await trio.sleep(0.02)  # one reload for a burst of notifications
            if scope.cancelled_caught:
                self._full = True
