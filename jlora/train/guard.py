"""What keeps a run folder safe: an exclusive lock while a run uses it, and SIGINT/SIGTERM
turned into "finish the step, checkpoint, exit".

- `RunLock(out)`: an `fcntl.flock` on `<out>/.lock` holding the owner's pid. A second
  `train.py --out <out>` fails at once with `RunLockedError` naming that pid. The kernel drops
  the lock when its process ends, however it ends (SIGKILL included), so a lock never outlives
  its run; the stale pid left in the file is overwritten by the next run.
- `Signals()`: while `deferring` is true (the training loop), SIGINT/SIGTERM only set
  `received`; the loop finishes the current step, writes a checkpoint and raises `Interrupted`.
  Outside it (loading, compiling) they raise `Interrupted` at once. A second SIGINT always
  raises at once.

Example:
  >>> import tempfile, pathlib
  >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
  >>> with RunLock(out):
  ...     try:
  ...         RunLock(out).acquire()
  ...     except RunLockedError as e:
  ...         print(str(e).split(" is in use")[0] == str(out))
  True
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import signal
import threading
from typing import Any

from jlora.errors import UserError

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunLockedError(UserError):
    """The run folder is in use by another process."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is 128 + the signal number (130, 143). A
    `KeyboardInterrupt`, so library code's `except Exception` cannot swallow it."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + int(signum)
        name = SIGNAL_NAMES.get(signal.Signals(signum), str(signum))
        super().__init__(message or f"interrupted by {name}")


class RunLock:
    """Exclusive lock of a run folder (created if missing) for the life of the context."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = pathlib.Path(out)
        self.path = self.out / ".lock"
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.out} is in use by another run (pid {holder}); wait for it to end or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Signals:
    """SIGINT/SIGTERM handling for the life of the context (main thread only; elsewhere a
    no-op)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        again = self.received == signal.SIGINT and signum == signal.SIGINT
        self.received = signum
        if not self.deferring or again:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Any:
        """Within this block a signal is only recorded (`received`)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
