"""The paper's experiments, built on the library (nothing in the library imports them).

- :mod:`~dynact.experiments.compare`: ``dynact compare``, activations compared over seeds.
- :mod:`~dynact.experiments.dpo`: ``dynact dpo``, GPT-2 fine-tuned with SFT then DPO.
- :mod:`~dynact.experiments.sweep`: the sweep engine both stand on (folder, records, run loop).
- :mod:`~dynact.experiments.train`, :mod:`~dynact.experiments.design`: ``dynact train`` and
  ``dynact design``.
- :mod:`~dynact.experiments.models`, :mod:`~dynact.experiments.data`: the paper's models and data
  modules (public as ``dynact.models`` and ``dynact.data``).
- :mod:`~dynact.experiments.reporting`: intervals and atomic file writes the reports share.
"""
