"""Server-side guards of the reward server against hostile clients: a request-head deadline for uvicorn's h11
protocol (slowloris) and a budget of decoded pixels in flight (memory)."""

from __future__ import annotations

import asyncio


class PixelBudget:
    """At most ``total`` decoded pixels in flight (decoded, not yet scored) over all requests: the decoded-image
    memory of the server is at most ``total x C x 4`` bytes. Requests wait for room (within their timeout)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = int(total), 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int) -> None:
        while self.used + n > self.total and self.used > 0:  # one request over the total alone still runs
            self._freed.clear()
            await self._freed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()


def guarded_h11(header_timeout: float = 10.0) -> type:
    """uvicorn's h11 protocol plus a request-head deadline: a connection that has not sent a complete request head
    within ``header_timeout`` s of connecting (or of the first byte of a later keep-alive request) is closed.
    uvicorn alone times only idle keep-alive connections, so a client that stops mid-header (slowloris) held its
    socket forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # a whole request head arrived
            elif self.conn.trailing_data[0] and not self.transport.is_closing():
                self._arm()  # part of a head is buffered: it has header_timeout to complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
