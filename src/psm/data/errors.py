"""Bad input, nothing lost: one record type for a problem with a row or file, and a log that keeps them.

Every loader reports a problem as a :class:`DataProblem` naming the file, row and reason. Under
``on_error="skip"`` the sample is dropped from the batch *and* appended to a JSON-lines report, one file
per process/worker so concurrent writers never interleave, and counted; under ``"raise"`` it is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class DataProblem:
    """What is wrong with one input: where (file, row, key, column) and why."""

    reason: str
    file: str | None = None
    row: int | None = None
    key: str | None = None
    column: str | None = None
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.key is not None:
            where.append(f"key {self.key}")
        if self.column:
            where.append(f"column {self.column}")
        return f"{', '.join(where) or '(input)'}: {self.reason}"


class DataError(ValueError):
    """Raised for a bad input under ``on_error="raise"``; carries the :class:`DataProblem`."""

    def __init__(self, problem: DataProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` policy name."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


class SkipLog:
    """Collects skipped samples in memory and appends them to ``<path>.<pid>.jsonl`` as they happen."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.problems: list[DataProblem] = []

    def _file(self) -> Path | None:
        if self.path is None:
            return None
        # One file per process: DataLoader workers are processes, and appends from several would interleave.
        return self.path.with_name(f"{self.path.name}.{os.getpid()}.jsonl")

    def record(self, problem: DataProblem) -> None:
        """Keep ``problem`` and append it to this process's report file (flushed immediately)."""
        self.problems.append(problem)
        target = self._file()
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(asdict(problem)) + "\n")
                fh.flush()

    def __len__(self) -> int:
        return len(self.problems)

    @staticmethod
    def read_all(path: str | os.PathLike[str]) -> list[DataProblem]:
        """Every problem recorded under ``path`` by any process."""
        path = Path(path)
        out = []
        for f in sorted(path.parent.glob(f"{path.name}.*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.append(DataProblem(**json.loads(line)))
        return out
