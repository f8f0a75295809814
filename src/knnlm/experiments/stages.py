"""Stages with a cache: each stage's result is kept with a fingerprint of its settings and of
the stages it depends on, so an interrupted reproduction resumes and a changed setting reruns
only what it affects."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from knnlm.fileio import canonical_json, short_sha256, write_json_atomic

FORMAT_VERSION = 2


@dataclass
class StageRecord:
    name: str
    seconds: float
    cached: bool
    result: dict
    cpu_seconds: float | None = None  # this process's CPU time: comparable across loads


class Pipeline:
    """Runs named stages with caching by fingerprint; keeps wall time per stage.

    Artifacts go to ``out/artifacts/<stage>/``, results to ``out/stages/<stage>.json``.
    """

    def __init__(self, out: Path, on_stage: Callable[[str, int, int], None] | None = None):
        self.out = out
        self.records: dict[str, StageRecord] = {}
        self.fingerprints: dict[str, str] = {}
        self.on_stage = on_stage
        self.total = 0
        self.index = 0

    def artifacts(self, name: str) -> Path:
        path = self.out / "artifacts" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, name: str, settings: dict, deps: list[str], fn: Callable[[Path], dict]) -> dict:
        self.index += 1
        if self.on_stage:
            self.on_stage(name, self.index, self.total)
        stage = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "deps": [self.fingerprints[d] for d in deps],
        }
        fp = short_sha256(canonical_json(stage))
        self.fingerprints[name] = fp
        record_file = self.out / "stages" / f"{name}.json"
        if record_file.is_file():
            try:
                saved = json.loads(record_file.read_text())
            except ValueError:
                saved = {}
            if saved.get("fingerprint") == fp:
                rec = StageRecord(
                    name, saved["seconds"], True, saved["result"], saved.get("cpu_seconds")
                )
                self.records[name] = rec
                return rec.result
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(self.artifacts(name))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json_atomic(
            record_file,
            {"fingerprint": fp, "seconds": seconds, "cpu_seconds": cpu, "result": result},
        )
        self.records[name] = StageRecord(name, seconds, False, result, cpu)
        return result

    def stage_times(self) -> dict[str, dict]:
        return {
            n: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "cached": r.cached}
            for n, r in self.records.items()
        }


class StageDisplay:
    """One overall progress display: which stage is running, out of how many."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]reproduce[/bold] {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("starting", total=1)

    def update(self, name: str, index: int, total: int) -> None:
        if self.progress is not None:
            # A line per stage as well: a log, or a terminal that shows no live bar, still
            # says where the run is.
            self.progress.console.print(f"reproduce: stage {index}/{total}: {name}")
            self.progress.update(
                self.task, description=f"stage: {name}", completed=index - 1, total=total
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.progress.tasks[0].total)
            self.progress.stop()
