"""``dynact dpo``: the paper's LLM experiment, GPT-2 fine-tuned with DPO, one run per activation
(arm), DPO penalty beta and seed.

Each run: supervised fine-tuning (TRL's ``SFTTrainer``) on the preferred responses, then DPO
(TRL's ``DPOTrainer``) against a frozen copy of the SFT model, evaluated by reward margin,
accuracy and loss on held-out pairs. Arms: ``gelu`` (GPT-2's own ``gelu_new``, the control),
``crrelu`` and any registry name (swapped into every MLP), ``eafo`` (GPT-2's GELU made a dynamic
:class:`~dynact.EAFOActivation` by :class:`~dynact.integrations.transformers.EAFOTrainerCallback`).
Every arm's layers are measured by the same core, so the per-layer entropy figures sit beside
the DPO figures.

Into ``--out``: ``runs/<arm>-beta<b>-seed<k>.json`` (each run's record, written atomically when
it ends), ``<arm>/beta<b>/seed<k>/`` and ``<arm>/sft/seed<k>/`` (TensorBoard), ``results.json``,
``report.md``, ``metrics_vs_beta.png`` and ``layers.png``; ``--resume`` continues an interrupted
sweep.

Modules: :mod:`~dynact.experiments.dpo.settings` (the paper's recipe and the offline preset),
:mod:`~dynact.experiments.dpo.data`, :mod:`~dynact.experiments.dpo.models`, :mod:`~dynact.experiments.dpo.runs`,
:mod:`~dynact.experiments.dpo.sweep`, :mod:`~dynact.experiments.dpo.report`, :mod:`~dynact.experiments.dpo.command`.
"""

from dynact.experiments.dpo.command import main
from dynact.experiments.dpo.settings import DPOSettings

__all__ = ["DPOSettings", "main"]

