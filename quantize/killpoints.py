"""Test-only fault injection: die by SIGKILL at a named point, to prove a rerun recovers.

`QUANTIZE_TEST_KILL_AT=<point>` makes the process kill itself the first time it reaches
`kill_point(<point>)` (and nothing else ever reads the variable). A process that leads its own
process group (tests start it with `start_new_session=True`) kills the whole group, so a tool it
is running at that moment (e.g. `git update-ref` holding a ref lock) dies with it, as under
`kill -9 -PGID`. Points: produced, placed, manifest, publish-objects, publish-commit, update-ref,
published, hub-branch, hub-commit. With `QUANTIZE_TEST_KILL_ONCE=<file>` only the first process to
create that file dies there (a retried task, e.g. on Ray, then gets past the point).
"""

from __future__ import annotations

import os
import signal

ENV = "QUANTIZE_TEST_KILL_AT"
ONCE_ENV = "QUANTIZE_TEST_KILL_ONCE"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            fd = os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {name}\n".encode())
        os.close(fd)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
