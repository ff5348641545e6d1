"""What ``dynact compare`` writes into ``--out``, as a :class:`~dynact.experiments.sweep.Layout`.

The folder's safety (only these files, the lock, records checked against the sweep's settings,
a damaged ``sweep.json`` named with its fix) is the sweep engine's
(:mod:`dynact.experiments.sweep.folder`); this module says what a compare sweep's files are and
what a finished run's record must hold.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Optional

from dynact.experiments.reporting import OutputError, write_text  # noqa: F401 (re-exported for the command)
from dynact.experiments.sweep import folder
from dynact.experiments.sweep.folder import (  # noqa: F401 (the folder's names, as compare's)
    LOCK_FILE,
    RECORDS,
    REPORT_FILE,
    RESULTS_FILE,
    TIMING_FILE,
    sweep_lock,
)

SETTINGS_FILE = "sweep.json"
#: TensorBoard run with each arm's mean over seeds, and the custom-scalars layout.
BY_ARM_RUN = "by_arm"
PNG_ACC = "acc_vs_epoch.png"
PNG_DELTA = "paired_differences.png"
PNG_LAYERS = "layer_measures.png"
RECORD_VERSION = 2

_NAME = re.compile(r"([a-z0-9_]+)-seed(\d+)")


def _parse(stem: str) -> Optional[tuple[str, int]]:
    match = _NAME.fullmatch(stem)
    return (match[1], int(match[2])) if match else None


def _top1_is_a_fraction(rec: dict[str, Any]) -> Optional[str]:
    return None if 0.0 <= rec["top1_final"] <= 1.0 else f"top1_final={rec['top1_final']} is not a fraction"


LAYOUT = folder.Layout(
    command="dynact compare",
    settings_file=SETTINGS_FILE,
    record_name=lambda key: f"{key[0]}-seed{key[1]}.json",
    parse_name=_parse,
    key_fields=("arm", "seed"),
    version=RECORD_VERSION,
    record_pattern=r"[a-z0-9_]+-seed\d+\.json",
    paths=(
        r"([a-z0-9_]+/seed\d+|" + BY_ARM_RUN + r")/(events\.out\.tfevents\.[^/]+|hparams\.yaml)",
        r"[a-z0-9_]+/seed\d+/checkpoints/[^/]+\.ckpt",  # with --trainer.enable_checkpointing true
    ),
    required={"arm": str, "seed": int},
    required_ok={"top1_final": float, "top1_best": float, "nll_final": float, "epochs": list, "steps": int,
                 "layers": dict},
    check_ok=_top1_is_a_fraction,
)


def record_path(out: Path, arm: str, seed: int) -> Path:
    return LAYOUT.record_path(out, (arm, seed))


def load_records(out: Path, settings) -> tuple[dict[tuple[str, int], dict], list[str]]:
    """The usable records of ``settings``' runs in ``out``, and one note per record set aside."""
    return folder.load_records(out, settings.identity(), LAYOUT)


def clear_run_files(out: Path, arm: str, seed: int) -> None:
    """Delete the TensorBoard files of an earlier attempt at a run (they would overlay the new
    one); files the sweep did not write are never there (the engine refuses such a folder)."""
    run = Path(out) / arm / f"seed{seed}"
    for path in (*run.glob("events.out.tfevents.*"), run / "hparams.yaml"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
