"""Deadline-bounded group commits of prediction records on one dedicated writer thread.

Callers hand rows to `CommitWriter.submit` and wait for the ticket with a deadline (threads with `wait`,
the event loop with `wait_async`); no request thread ever blocks on the database. A ticket ends in exactly
one of two states, decided under one lock: acknowledged (its rows are committed and the caller may answer)
or abandoned (the caller gave up and answered 503). Rows of a ticket abandoned before the commit are
deleted inside the transaction; rows of one abandoned while the commit was in flight (a hung database
that recovers later) are deleted right after it, so no prediction the client never received stays stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from dermlens.errors import RecordsUnavailable

log = logging.getLogger("dermlens.serve")


@dataclass(eq=False)
class Ticket:
    """One caller's items, waiting for the writer; `future` resolves to the committed rows."""

    items: list[Any]
    future: Future = field(default_factory=Future)
    rows: list[Any] = field(default_factory=list)
    abandoned: bool = False


class CommitWriter:
    """One writer thread: group commits (one transaction per wake-up), tickets abandoned at the deadline."""

    def __init__(
        self,
        session: Callable[[], Session],
        build: Callable[[Any], Any],
        model: Any,
        deadline_s: float,
        begin: list[str] | None = None,
        probe_every_s: float = 1.0,
    ):
        self.session, self.build, self.model, self.begin = session, build, model, begin or []
        self.deadline_s, self.probe_every_s = deadline_s, probe_every_s
        self._queue: deque[Ticket] = deque()
        self._wake = threading.Condition()
        self._decide = threading.Lock()  # acknowledged vs abandoned: decided under this lock only
        self._busy_since: float | None = None
        self._healthy, self._closed = True, False
        self._thread = threading.Thread(target=self._run, name="dermlens-records-writer", daemon=True)
        self._thread.start()

    def available(self) -> bool:
        """False while the last write failed or a write has been stuck past the deadline."""
        busy = self._busy_since
        stuck = busy is not None and time.monotonic() - busy > self.deadline_s
        return self._healthy and not stuck

    def submit(self, items: list[Any]) -> Ticket:
        """Queue `items` for the next group commit (returns at once)."""
        ticket = Ticket(items)
        with self._wake:
            self._queue.append(ticket)
            self._wake.notify()
        return ticket

    def abandon(self, ticket: Ticket) -> bool:
        """Give up on `ticket` unless it is already acknowledged; True if it was abandoned."""
        with self._decide:
            if ticket.future.done():
                return False
            ticket.abandoned = True
            return True

    def wait(self, ticket: Ticket, timeout: float | None = None) -> list[Any]:
        """The committed rows, or RecordsUnavailable once `timeout` (default: the deadline) has passed."""
        try:
            return ticket.future.result(self.deadline_s if timeout is None else timeout)
        except TimeoutError:
            return self._timed_out(ticket)

    async def wait_async(self, ticket: Ticket) -> list[Any]:
        """`wait` for the event loop: no thread is held while the database is slow."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ticket.future)), self.deadline_s)
        except TimeoutError:
            return self._timed_out(ticket)

    def _timed_out(self, ticket: Ticket) -> list[Any]:
        if not self.abandon(ticket):  # committed in the meantime: it counts as answered
            return ticket.future.result()
        self._healthy = False
        raise RecordsUnavailable(f"records database did not commit within {self.deadline_s:g} s")

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=self.deadline_s + 1)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._queue and not self._closed:
                    self._wake.wait(self.probe_every_s)
                if self._closed and not self._queue:
                    return
                batch = [t for t in self._queue if not t.abandoned]
                self._queue.clear()
            if batch:
                self._write(batch)
            elif not self._healthy:
                self._probe()

    def _write(self, batch: list[Ticket]) -> None:
        self._busy_since = time.monotonic()
        try:
            late = self._commit(batch)
        except (OperationalError, DBAPIError) as e:  # locked / unreachable: nothing was stored
            self._healthy = False
            self._fail(batch, RecordsUnavailable(f"records database unavailable: {first_line(e)}"))
        except Exception as e:  # noqa: BLE001 - the transaction rolled back: every waiter gets the error
            self._fail(batch, e)
        else:
            self._healthy = True
            if late:
                self._delete_late(late)
        finally:
            self._busy_since = None

    def _commit(self, batch: list[Ticket]) -> list[Ticket]:
        """One transaction for `batch`; returns the tickets abandoned while the commit was in flight."""
        for t in batch:
            t.rows = [self.build(item) for item in t.items]
        with self.session() as session, session.begin():
            self._limit(session)
            session.add_all([r for t in batch for r in t.rows])
            session.flush()
            with self._decide:
                gone = [t for t in batch if t.abandoned]
            self._delete(session, gone)
        with self._decide:
            late = [t for t in batch if t.abandoned and t not in gone]
            for t in batch:
                if not t.abandoned:
                    t.future.set_result(t.rows)
        return late

    def _limit(self, session: Session) -> None:
        for sql in self.begin:  # the database's own time-outs for this transaction
            session.execute(text(sql))

    def _delete(self, session: Session, tickets: list[Ticket]) -> None:
        ids = [r.id for t in tickets for r in t.rows]
        if ids:
            session.execute(delete(self.model).where(self.model.id.in_(ids)))

    def _delete_late(self, late: list[Ticket]) -> None:
        """Remove rows committed after their caller answered 503 (the database came back late)."""
        n = sum(len(t.rows) for t in late)
        try:
            with self.session() as session, session.begin():
                self._limit(session)
                self._delete(session, late)
            log.warning("records: %d late commit(s) of unanswered predictions removed", n)
        except Exception as e:  # noqa: BLE001 - logged; the rows carry no acknowledged answer
            log.error("records: could not remove %d unanswered record(s): %s", n, first_line(e))

    def _fail(self, batch: list[Ticket], error: BaseException) -> None:
        with self._decide:
            for t in batch:
                if not t.abandoned:
                    t.future.set_exception(error)

    def _probe(self) -> None:
        """While unavailable: try a write lock (a no-op DELETE, rolled back); success marks it healthy."""
        self._busy_since = time.monotonic()
        try:
            with self.session() as session:
                self._limit(session)
                session.execute(delete(self.model).where(self.model.id == ""))
                session.rollback()
            self._healthy = True
        except Exception:  # noqa: BLE001 - still unavailable; probed again later
            pass
        finally:
            self._busy_since = None


def first_line(e: BaseException) -> str:
    """The driver's message, first line only, bounded (no SQL, no parameters)."""
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]
