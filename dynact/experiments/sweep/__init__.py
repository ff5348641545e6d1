"""The sweep engine under ``dynact compare`` and ``dynact dpo``.

A sweep is a plan of *cells* (compare: arm x seed; dpo: arm x beta x seed), each one training
run with a JSON record. :mod:`.folder` keeps the output folder safe (only the sweep's own files,
a lock, records checked against the sweep's settings, damaged files named); :mod:`.engine` runs
the cells not finished yet, writes each record as it ends and the report at the end, and keeps
what finished through a failed run, a full disk or Ctrl-C. A command supplies its
:class:`~dynact.experiments.sweep.folder.Layout`, its settings' identity, a function that runs
cells, and its report.
"""

from dynact.experiments.sweep.engine import Sweep, SweepWriteError, failed_record, finished, run_sweep
from dynact.experiments.sweep.folder import Layout, sweep_lock

__all__ = ["Layout", "Sweep", "SweepWriteError", "failed_record", "finished", "run_sweep", "sweep_lock"]
