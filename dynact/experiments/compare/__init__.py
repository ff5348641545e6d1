"""``dynact compare``: does dynamic EAFO beat static CRReLU, and both beat a fixed ReLU, on my task?

One command trains every arm (an activation) with every seed through the same
:class:`~dynact.experiments.models.ImageClassifier`, data module and schedule, measures each MLP activation
with :class:`~dynact.callbacks.EAFOCallback` (monitor mode for static arms, so the layer
measures and accuracy sit side by side), and writes into ``--out``:

- ``<arm>/seed<k>/``: one TensorBoard run per arm and seed, and ``by_arm/``: the arms' means
  with a custom-scalars layout (one chart per layer overlaying the arms);
- ``runs/<arm>-seed<k>.json``: each finished run's record, with the settings it was made
  under, written whole the moment the run ends, so an interrupted sweep resumes (``--resume``);
- ``results.json``: the settings, the environment, every run and the per-arm summary (the same
  command on the same machine writes the same numbers); ``timing.json``: wall times;
- ``report.md``: a table shaped like the paper's (arms as columns): top-1, top-5, NLL; every
  comparison that matters (each arm against the control, and dynamic EAFO against static CRReLU
  when both run), paired by seed, with Student-t intervals Bonferroni-adjusted for the number of
  comparisons and a verdict sentence each; the plateau check of every run (the run that moved
  most over its last 5 epochs is named); the per-layer measures; and the plots
  ``paired_differences.png``, ``acc_vs_epoch.png`` and ``layer_measures.png``. The CPU model,
  thread count, torch version and kernel mode go into ``timing.json`` and the report.

Example::

    dynact compare                                    # digits, relu/crrelu/eafo, 50 seeds, CPU
    dynact compare --seeds 50:100 --out check         # the same design on 50 other seeds
    dynact compare --task cifar10 --model vit_tiny --arms relu,crrelu,eafo,gelu,elu,prelu,celu,silu,mish \\
        --seeds 3 --epochs 100 --out cifar10_vit_tiny \\
        --data.root data --data.download true --trainer.accelerator gpu --trainer.precision bf16-mixed

Arms: ``relu`` is the control (a fixed ReLU); ``eafo`` is built with ReLU and turned into
dynamic :class:`~dynact.EAFOActivation` modules by ``EAFOCallback(mode="refresh")``; every other
registry name (``crrelu``, ``gelu``, ...) is a static arm, measured with
``EAFOCallback(mode="monitor", convert=())``. Seed ``k`` goes through
``lightning.seed_everything(k)`` before the data module (whose split is drawn by ``k`` when it
takes a ``seed``) and the model are built, so at each seed all arms share initial weights, split
and data order, and differences are paired.

Modules (under ``dynact.experiments.compare``): ``settings`` (tasks, command line), ``records``
(the folder's layout and records, on :mod:`dynact.experiments.sweep`), ``runs`` (one run;
parallel runs), ``stats``, ``report``, ``plots`` and ``command`` (``main``).

Exit codes: 0 done; 1 some runs failed (recorded, redone by ``--resume``); 2 bad input or an
unusable ``--out``, found before any training; 3 a file could not be written, or a worker process died,
mid-sweep (finished runs kept); 130 interrupted (finished runs kept).
"""

from dynact.experiments.compare.command import main, run_sweep, write_results
from dynact.experiments.compare.report import write_report
from dynact.experiments.compare.settings import TASKS, SweepSettings
from dynact.experiments.compare.stats import summarize

__all__ = ["SweepSettings", "TASKS", "main", "run_sweep", "summarize", "write_report", "write_results"]
