"""Progress reporting, decoupled from any display: stages report, the CLI (rich) or a worker
(database heartbeat) shows."""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    def start(self, key: str, description: str, total: int) -> None: ...

    def advance(self, key: str, amount: int = 1) -> None: ...

    def finish(self, key: str) -> None: ...


class NullProgress:
    """Reports nowhere (``--quiet``, tests)."""

    def start(self, key: str, description: str, total: int) -> None:
        pass

    def advance(self, key: str, amount: int = 1) -> None:
        pass

    def finish(self, key: str) -> None:
        pass
