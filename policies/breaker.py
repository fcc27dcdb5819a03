"""Circuit breaking per backend: stop sending to one that keeps failing, probe it later.

pybreaker keeps the state machine (closed → open → half-open → closed), the cool-down and
the listeners. Around it: a failure-ratio window (pybreaker counts only consecutive
failures), a bound on concurrent half-open probes (pybreaker lets every call through), and
a non-blocking `allows()` the router asks while selecting, before any attempt.

Decisions are always local: nothing here waits on another process. To share state across
gateway processes, `policies.breaker_sync` hears each local transition (`on_local_change`)
and hands other processes' transitions to `apply_remote`, which orders them by the wall-clock
time they happened (`changed_at`): the latest transition wins, wherever it was made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

import pybreaker

from gateway.config import BreakerConfig
from gateway.errors import BreakerOpen
from policies.retry import AttemptFailed
from policies.window import SlidingPair

logger = logging.getLogger("vgate.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class _Transitions(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str, str, str], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else "none"
        self._on_change(cb.name or "?", old, new_state.name)


class BackendBreaker:
    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        route: str = "",
        on_change: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.route = route
        self.config = config
        # Called after each transition this process made itself (not one applied from
        # elsewhere); set by whatever shares the state. Never called on the hot path.
        self.on_local_change: Callable[[BackendBreaker], None] | None = None
        self.changed_at = 0.0  # wall clock of the last transition, local or applied
        self.changed_locally = False  # whether that transition was this process's own
        self._applying: float | None = None  # `at` of the remote transition being applied
        listeners: list[pybreaker.CircuitBreakerListener] = [_Transitions(self._changed)]
        if on_change is not None:
            listeners.append(_Transitions(on_change))
        self._storage = pybreaker.CircuitMemoryStorage(CLOSED)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=config.consecutive_failures,
            reset_timeout=config.open_s,
            # Only failures the backend is to blame for count; a client's 400 does not.
            exclude=[lambda exc: not (isinstance(exc, AttemptFailed) and exc.backend_fault)],
            listeners=listeners,
            state_storage=self._storage,
            name=name,
            throw_new_error_on_trip=False,
        )
        self._unguarded = _Unguarded(self)
        self._outcomes = SlidingPair(config.window_s, clock)  # successes, failures
        self._probes = 0

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    def allows(self) -> bool:
        """May an attempt go to this backend now? Never blocks, never changes state."""
        state = self._breaker.current_state
        if state == CLOSED:
            return True
        if state == OPEN:
            opened_at = self._storage.opened_at
            if opened_at is None:
                return False
            cooled = time.time() - opened_at.timestamp() >= self.config.open_s
            return cooled and self._probes < self.config.half_open_probes
        return self._probes < self.config.half_open_probes

    def attempt(self) -> AbstractContextManager[None]:
        """Record the enclosed attempt; an `AttemptFailed` with `backend_fault` counts against it.

        Raises `BreakerOpen` without running the block if the breaker refuses the call
        (pybreaker's own error never leaves this module).
        """
        breaker = self._breaker
        if breaker.current_state == CLOSED and breaker.fail_counter == 0:
            return self._unguarded
        return self._guarded()

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        breaker = self._breaker
        probing = breaker.current_state != CLOSED
        if probing:
            self._probes += 1
        failed: bool | None = None  # None: the block did not run, or failed by no fault of its own
        entered = False
        try:
            with breaker.calling():
                entered = True
                try:
                    yield
                except AttemptFailed as failure:
                    failed = True if failure.backend_fault else None
                    raise
                failed = False
        except pybreaker.CircuitBreakerError:
            if entered:
                raise
            raise BreakerOpen(self.name) from None
        finally:
            if probing:
                self._probes -= 1
            # After pybreaker has seen the outcome, so that the two never trip over each other.
            if failed is not None:
                self._count(failed=failed)

    def _report_failure(self, failure: AttemptFailed) -> None:
        # Another attempt may have opened the breaker meanwhile: then it refuses the call
        # (CircuitBreakerError) and there is nothing left for this failure to open.
        with suppress(AttemptFailed, pybreaker.CircuitBreakerError):
            self._breaker.call(_reraise, failure)
        self._count(failed=True)

    def _count(self, *, failed: bool) -> None:
        if not failed:
            self._outcomes.add_first()
            return
        self._outcomes.add_second()
        if self._breaker.current_state != CLOSED:
            return
        successes, failures = self._outcomes.totals()
        total = successes + failures
        if total >= self.config.min_requests and failures / total >= self.config.failure_ratio:
            self._outcomes.clear()
            self._breaker.open()

    @property
    def opened_at(self) -> float | None:
        """Wall-clock time the breaker last opened; None while closed."""
        opened_at = self._storage.opened_at
        if opened_at is None or self._breaker.current_state == CLOSED:
            return None
        return opened_at.timestamp()

    def apply_remote(self, state: str, opened_at: float | None, at: float) -> bool:
        """Take on a transition another process made at `at` (wall clock), if it is newer
        than the last one this breaker knows of. Open or half-open elsewhere means open
        here, cooling down from the same `opened_at`, so every process probes again at the
        same moment. Returns whether anything changed. Never calls `on_local_change`.
        """
        if at <= self.changed_at:
            return False
        breaker = self._breaker
        current = breaker.current_state
        if state == CLOSED:
            if current == CLOSED:
                self.changed_at, self.changed_locally = at, False
                return False
            self._apply(at, breaker.close)
            self._outcomes.clear()
            return True
        if state not in (OPEN, HALF_OPEN) or opened_at is None:
            return False
        # A clock ahead of ours must not hold the backend out for longer than open_s.
        opened = datetime.fromtimestamp(min(opened_at, time.time()), UTC)
        if current == OPEN:
            stored = self._storage.opened_at
            self.changed_at, self.changed_locally = at, False
            if stored is not None and stored >= opened:
                return False
            self._storage.opened_at = opened  # opened again elsewhere: cool down from then
            return True

        def open_from_then() -> None:
            breaker.open()
            self._storage.opened_at = opened

        self._apply(at, open_from_then)
        self._outcomes.clear()
        return True

    def _apply(self, at: float, transition: Callable[[], object]) -> None:
        self._applying = at
        try:
            transition()
        finally:
            self._applying = None

    def _changed(self, name: str, old: str, new: str) -> None:
        applying = self._applying
        if applying is not None:
            self.changed_at, self.changed_locally = applying, False
            logger.info("breaker %s: %s -> %s (as another gateway process saw)", name, old, new)
            return
        self.changed_at, self.changed_locally = time.time(), True
        logger.warning("breaker %s: %s -> %s", name, old, new)
        if self.on_local_change is not None:
            self.on_local_change(self)


def _reraise(failure: AttemptFailed) -> None:
    raise failure


class _Unguarded:
    """The common case, closed with no failure counted, kept cheap: pybreaker's guarded call
    costs ~9 µs. A success leaves nothing for pybreaker to reset; a failure is handed to it
    afterwards. Stateless, so one instance serves every attempt on the backend."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: BackendBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None:
            self._breaker._count(failed=False)
        elif isinstance(exc, AttemptFailed) and exc.backend_fault:
            self._breaker._report_failure(exc)
        return False
