"""A child process of the launcher, in its own process group, that dies with it."""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

#: Where the ``stageserver`` package is imported from: a child imports the same one,
#: whether it is installed or run from a checkout.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class Child:
    """A process in its own process group. With ``capture``, its output is forwarded with
    a prefix and the last lines are kept for an error message."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], *, capture: bool
    ) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=25)
        self._partial = b""
        path = [PACKAGE_PARENT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        self.proc = subprocess.Popen(
            argv,
            env={**env, "PYTHONPATH": os.pathsep.join(path)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.pid = self.proc.pid
        if self.proc.stdout is not None:
            os.set_blocking(self.proc.stdout.fileno(), False)

    def exit_code(self) -> int | None:
        """The exit status once the process has ended, without reaping it: until reaped,
        its pid (the group id) cannot be reused, so the group can still be swept safely."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.wait()
        if info is None:
            return None
        return -info.si_status if info.si_code != os.CLD_EXITED else info.si_status

    def read_output(self) -> bool:
        """Forward what is there; False at the end of the output."""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return False
        try:
            data = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if not data and not self._partial:
            return False
        lines = (self._partial + (data or b"\n")).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                sys.stderr.write(f"{self.name} | {line}\n")
        sys.stderr.flush()
        return bool(data)

    def signal(self, signum: int) -> None:
        if self.exit_code() is None:
            os.kill(self.pid, signum)

    def reap(self) -> int:
        """Kill whatever is left in the group, then collect the exit status."""
        code = self.exit_code()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if code is None:
            code = self.proc.wait()
        else:
            self.proc.wait()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            for _ in range(64):  # bounded: a grandchild may still hold the pipe open
                if not self.read_output():
                    break
            self.proc.stdout.close()
        return code

    def last_output(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
