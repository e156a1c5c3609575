"""DVCLive logging of the training stages, through DVCLive's public API only.

``Live(dir, save_dvc_exp=False, dvcyaml=False, report=None)``: DVCLive saves no experiment of its own
(the stage runs inside `dvc repro` / `dvc exp run`, which record it), writes no dvc.yaml (the project's
dvc.yaml declares the directory as the stage's output and plots its loss curve) and no report. Inside
`dvc exp run` DVCLive knows the experiment (name, baseline revision, the repository's Studio config):
the first logged row, and then one row every ``LIVE_UPDATE_SECONDS`` at most, ends with ``next_step()``, which
writes ``metrics.json``, signals the step to the VS Code extension and, when a Studio token is configured
(``dvc studio login`` or ``DVC_STUDIO_TOKEN``), posts the new points to DVC Studio; ``end()`` posts the rest
and waits for it. Without a token nothing is sent. (``next_step()`` re-reads every plot file, so calling it
on each of a teacher's 2,500 rows cost 26 s; at most one per 10 s keeps it negligible.)
Outside a Git repository (library calls in a temporary directory) only the files are written; inside a Git
repository without DVC, DVCLive runs `dvc init` itself (checked with dvclive 3.49), and in one without a commit it
cannot start (a one-line error says to commit first). Files:

    plots/metrics/<prefix>loss/<key>.tsv   one row per logged step (columns step, <key>); a single loss
                                           named "loss" (teacher, baselines) is <prefix>loss.tsv
    plots/metrics/<prefix>lr.tsv, <prefix>kimg.tsv
    plots/custom/<prefix>loss.json         every log row at once ({step, kimg, lr, loss}), x = kimg; ``loss`` is
                                           the mean of the row's step losses (one curve per stage, dvc.yaml's plots)
    metrics.json                           the latest values and the run's final metrics (``final``)

A resumed run starts the directory afresh and replays the log rows kept in its training state, so
the files equal those of an uninterrupted run. DVCLive's messages follow its ``DVCLIVE_LOGLEVEL``
(default WARNING).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.param_checks import PipelineError

ROW_FIELDS = ("step", "kimg", "lr")  # log-row entries that are not losses
LIVE_UPDATE_SECONDS = 10.0  # the most often a row ends with DVCLive's next_step() (a live update)


class LiveLog:
    """One DVCLive run directory shared by the loops of a stage (PD rounds, SFDDM students use a prefix each)."""

    def __init__(self, directory: str | Path) -> None:
        from pipeline.core.distributed import is_main

        self.directory = Path(directory)
        self.enabled = is_main()  # under torchrun only rank 0 logs; the others' calls do nothing
        if not self.enabled:
            return
        from dvclive import Live
        from scmrepo.exceptions import SCMError

        self._next_update = 0.0  # time.monotonic() from which the next row is a live update
        try:
            self.live = Live(dir=str(directory), save_dvc_exp=False, dvcyaml=False, report=None)
        except SCMError as e:  # DVCLive reads the repository's revision; an empty Git repository has none
            raise PipelineError(f"{directory}: DVCLive cannot log in this Git repository ({e}): commit once "
                                "(git add -A && git commit), then run again") from None
        except (OSError, sqlite3.Error) as e:  # it opens the enclosing DVC repository (config, state database)
            raise PipelineError(f"{directory}: DVCLive could not open the DVC repository around {Path.cwd()}: "
                                f"{type(e).__name__}: {e}") from None

    def log_row(self, row: Mapping[str, Any], *, step: int, prefix: str = "") -> None:
        """Per-step metrics of one log row: lr, kimg and one loss per key (None: not drawn in this window); then
        DVCLive's ``next_step()`` (metrics.json, the live update to DVC / Studio) when the last was
        ``LIVE_UPDATE_SECONDS`` ago or more."""
        if not self.enabled:
            return
        self.live.step = int(step)
        for name, value in _ordered(row).items():
            if name == "step" or value is None:
                continue
            metric = name if name in ROW_FIELDS or name == "loss" else f"loss/{name}"
            self.live.log_metric(f"{prefix}{metric}", float(value))
        now = time.monotonic()
        if now >= self._next_update:
            self._next_update = now + LIVE_UPDATE_SECONDS
            self.live.next_step()
            self.live.step = int(step)  # next_step() counts on by one; the step is the loop's batch number

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
        """metrics.json as logged so far (at every checkpoint and at the end of each loop)."""
        if self.enabled:
            self.live.make_summary()

    def end(self) -> None:
        """The stage's last call: DVCLive's ``end()`` (the final files, the last live update, posted before it returns)."""
        if self.enabled:
            self.live.make_summary()  # end() takes the step from the summary: the last row's, not the last update's
            self.live.end()


def _ordered(row: Mapping[str, Any]) -> dict[str, Any]:
    """step, kimg, lr, then the losses by name: the same files whether a row was logged live or replayed
    from a saved state (whose JSON has sorted keys)."""
    return {**{k: row[k] for k in ROW_FIELDS if k in row}, **{k: row[k] for k in sorted(row) if k not in ROW_FIELDS}}
