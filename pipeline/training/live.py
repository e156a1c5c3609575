"""DVCLive logging that only writes files: ``<dir>/metrics.json`` and ``<dir>/plots/``.

``Live(dir, save_dvc_exp=False, dvcyaml=None, report=None)``: no experiment is saved, no dvc.yaml
written, no report; the stage declares ``metrics.json`` as a metric and ``plots/`` as plots in the
project's dvc.yaml, so `dvc exp show` and `dvc plots` read them. Files written:

    plots/metrics/<prefix>loss/<key>.tsv   one row per logged step (columns step, <key>); a single loss
                                           named "loss" (teacher, baselines) is <prefix>loss.tsv
    plots/metrics/<prefix>lr.tsv, <prefix>kimg.tsv
    plots/custom/<prefix>loss.json         every log row at once ({step, kimg, lr, loss}), x = kimg; ``loss`` is
                                           the mean of the row's step losses (one curve per stage, dvc.yaml's plots)
    metrics.json                           the latest values and the run's final metrics (``final``)

A resumed run starts the directory afresh and replays the log rows kept in its training state, so
the files equal those of an uninterrupted run. DVCLive's INFO messages are silenced.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROW_FIELDS = ("step", "kimg", "lr")  # log-row entries that are not losses


class LiveLog:
    """One DVCLive run directory shared by the loops of a stage (PD rounds, SFDDM students use a prefix each)."""

    def __init__(self, directory: str | Path) -> None:
        from pipeline.core.distributed import is_main

        self.directory = Path(directory)
        self.enabled = is_main()  # under torchrun only rank 0 logs; the others' calls do nothing
        if not self.enabled:
            return
        logger = logging.getLogger("dvclive")
        level = logger.level
        logger.setLevel(logging.WARNING)  # no "Logging to experiment ..." banner in the stage output
        try:
            self.live = _files_only_live()(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)
        finally:
            logger.setLevel(level)
        self.directory = Path(directory)

    def log_row(self, row: Mapping[str, Any], *, step: int, prefix: str = "") -> None:
        """Per-step metrics of one log row: lr, kimg and one loss per key (None: not drawn in this window)."""
        if not self.enabled:
            return
        self.live.step = int(step)
        for name, value in _ordered(row).items():
            if name == "step" or value is None:
                continue
            metric = name if name in ROW_FIELDS or name == "loss" else f"loss/{name}"
            self.live.log_metric(f"{prefix}{metric}", float(value))

    def log_table(self, rows: Sequence[Mapping[str, Any]], *, x: str, prefix: str = "", title: str | None = None) -> None:
        """The loss per log row as one custom plot (x = kimg for SFD): ``step``, ``kimg``, ``lr`` and ``loss``, the
        mean of the row's step losses (or its single loss). Every row has the same fields (DVC's plots refuse rows
        that differ, as SFD-v's rows would: each holds the losses of the N it drew); the per-step curves are the
        per-key TSVs of :meth:`log_row`."""
        if not rows or not self.enabled:
            return
        points = []
        for r in rows:
            losses = [v for k, v in r.items() if k not in ROW_FIELDS and v is not None]
            if losses:
                points.append({**{k: r[k] for k in ROW_FIELDS if k in r}, "loss": sum(losses) / len(losses)})
        if points:
            self.live.log_plot(f"{prefix}loss", points, x=x, y=["loss"], template="linear", title=title, y_label="loss")

    def log_final(self, metrics: Mapping[str, Any], prefix: str = "final/") -> None:
        """Final metrics (numbers, or mappings of numbers) into metrics.json under ``final``."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            if isinstance(value, Mapping):
                self.log_final(value, prefix=f"{prefix}{name}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.live.log_metric(f"{prefix}{name}", value, plot=False)

    def flush(self) -> None:
        if self.enabled:
            self.live.make_summary()


def _files_only_live() -> type:
    """DVCLive's Live without its repository probe: it would open the enclosing Git/DVC repository (DVC's
    experiment name, Studio, the `dvc exp` signal file), which a logger that only writes files never needs."""
    from dvclive import Live

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_repo = None

    return FilesOnlyLive


def _ordered(row: Mapping[str, Any]) -> dict[str, Any]:
    """step, kimg, lr, then the losses by name: the same files whether a row was logged live or replayed
    from a saved state (whose JSON has sorted keys)."""
    return {**{k: row[k] for k in ROW_FIELDS if k in row}, **{k: row[k] for k in sorted(row) if k not in ROW_FIELDS}}
