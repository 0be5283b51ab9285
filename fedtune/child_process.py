"""Child processes a deploy command supervises (the site worker, the SuperNode, the
SuperLink, its reverse proxy): output relayed to this terminal with a prefix and kept
for error messages, a graceful stop, and stopping the helpers Flower detaches."""

from __future__ import annotations

import subprocess
import threading

from fedtune.flower_env import child_env


def stop_helpers(pid: int) -> None:
    """Stop the helpers Flower detaches from a process (they carry `--parent-pid PID`)."""
    subprocess.run(["pkill", "-TERM", "-f", f"[-]-parent-pid {pid}( |$)"], capture_output=True)


class Relay:
    """Runs a child with its output relayed to this terminal (prefixed) and kept."""

    def __init__(
        self, cmd: list[str], prefix: str = "", env: dict[str, str] | None = None, user: tuple[int, int] | None = None
    ) -> None:
        """`user`: (uid, gid) to run the child as (no supplementary groups); needs root."""
        self.output: list[str] = []
        as_user: dict[str, object] = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        self.child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env if env is not None else child_env(),
            **as_user,
        )  # type: ignore[call-overload]
        # Read in a thread: Flower's detached helpers inherit the pipe and may hold it
        # open after the child itself has exited.
        self.reader = threading.Thread(target=self._relay, args=(prefix,), daemon=True)
        self.reader.start()

    def _relay(self, prefix: str) -> None:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            self.output.append(line)
            print(f"{prefix}{line}", end="", flush=True)

    def last_lines(self, count: int = 2) -> str:
        """The child's last non-empty output lines, joined for a one-line message."""
        self.reader.join(timeout=2)
        return " / ".join([x.strip() for x in self.output if x.strip()][-count:]) or "no output"

    def stop(self, grace: float = 15.0) -> int:
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self.reader.join(timeout=2)
        return int(self.child.wait())
