"""A training process dies with the process that started it: imported first by `tinystories_lab.pretrain`,
before torch and Lightning (seconds of imports during which the parent may die).

The runner passes its pid in TINYSTORIES_LAB_PARENT_PID; each training process asks the kernel for SIGKILL
when its parent dies (Linux), then checks the parent is still the one it was started by (had it died before
the asking, nothing would ever signal it), and passes its own pid on to the ranks it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID = "TINYSTORIES_LAB_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Get SIGKILL when the parent process dies, so no orphan keeps training (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def hold_on() -> None:
    """Die with the parent named in PARENT_PID (or, for a rank Lightning started, with that rank); exit at
    once if that parent is already gone."""
    parent = os.environ.get(PARENT_PID)
    if parent is None and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        return  # started by hand, by SLURM or by a benchmark: nothing to die with
    die_with_parent()
    if parent is not None and os.getppid() != int(parent):
        print(
            f"error: the process that started this one (pid {parent}) is gone; not training.", file=sys.stderr
        )
        sys.exit(1)
    os.environ[PARENT_PID] = str(os.getpid())  # the ranks this process starts die with it


hold_on()
