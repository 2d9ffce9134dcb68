"""A run's metrics: `metrics.jsonl`, one JSON record per line (kind "start", "train", "eval", "final", ...), written by
the main rank as training goes (and to TensorBoard when it is installed and wanted), read by the report and the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from oryx.training import runfolder
from oryx.training.config import ConfigError
from oryx.training.runfolder import METRICS


class MetricsLog:
    """Append-only JSONL log (and TensorBoard scalars when installed and wanted), on the main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / METRICS
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate(resume_step)
        runfolder.record(run_dir, METRICS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb_before = set((run_dir / "tensorboard").glob("*"))
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        self.fh = open(self.path, "a")  # noqa: SIM115 (open for the whole run; close() closes it)

    def _truncate(self, step: int) -> None:
        """Drop records after `step` (written by a run killed after its last checkpoint) and a torn last line."""
        if not self.path.is_file():
            return
        kept = [json.dumps(r) for r in _parse_metrics(self.path, tolerate_torn_end=True) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                self.writer.close()
                runfolder.record(self.run_dir, *(set((self.run_dir / "tensorboard").glob("*")) - self.tb_before))


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] without one).

    Raises:
        ConfigError: a line that is not a JSON record (naming the file and the line).
    """
    path = Path(run_dir) / METRICS
    return _parse_metrics(path) if path.is_file() else []


def _parse_metrics(path: Path, tolerate_torn_end: bool = False) -> list[dict[str, Any]]:
    """The JSON records of a metrics file; a damaged line is refused, but with `tolerate_torn_end` a damaged last
    line (a write cut short by a kill) is dropped."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if tolerate_torn_end and number == len(lines):
                break
            raise ConfigError(
                f"{path} is damaged: line {number} is not a JSON record; remove that line (or the file, losing the "
                "run's history) and run again"
            ) from None
        records.append(record)
    return records
