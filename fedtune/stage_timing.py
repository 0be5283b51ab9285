"""Timestamps a deployed site adds to each reply so the coordinator can split a round's
wall time into Flower's polling, the ClientApp process start, and the site's own work:
when the ClientApp process started, and when its handler began and ended (wall clock).
The record travels beside Flower's own records; no workflow reads it."""

from __future__ import annotations

import os
import time

TIMING_RECORD = "fedtune.timing"


def process_start_time() -> float:
    """This process's start as wall-clock seconds (Linux: /proc, 10 ms ticks); now elsewhere."""
    try:
        fields = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 overall: starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, IndexError, ValueError, AttributeError):
        return time.time()
