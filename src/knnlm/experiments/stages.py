"""Stages with a cache: each stage's result is kept with a fingerprint of its settings and of
the stages it depends on, so an interrupted reproduction resumes and a changed setting reruns
only what it affects.

The settings in a stage's fingerprint are the ones it read: it runs on a :class:`ReadRecorder`
of the run's settings, which notes every field read (through properties too), and its record
keeps those fields. A cached stage is reused when every field it read last time still has the
value it had (the same values take a stage down the same path, so it would read the same
fields again), its fixed settings are the same and so are the fingerprints of the stages it
depends on. No list of keys is kept by hand, so none can be forgotten.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from knnlm.fileio import canonical_json, short_sha256, write_json_atomic

# 3: the settings a stage read are in its fingerprint (2: hand-kept key lists).
FORMAT_VERSION = 3

# The results of the stages run so far, by stage name.
Done = dict[str, dict]


@dataclass(frozen=True)
class Stage:
    """One cached stage of the reproduction.

    ``name`` is its cache key. It runs as ``run(cfg, done, art, **args)``, where ``cfg`` is a
    view of the run's settings that notes the fields the stage reads: those fields and their
    values, the ``fixed`` settings, those ``from_results`` reads off earlier stages, and the
    fingerprints of the stages in ``deps`` make its fingerprint. The second process takes
    whole ``group``s.
    """

    name: str
    run: Callable[..., dict]
    _: KW_ONLY
    deps: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)
    from_results: Callable[[Any, Done], dict] | None = None
    group: str = "main"

    def settings(self, cfg: Any, done: Done) -> dict:
        """The stage's own settings: ``fixed`` and what it reads off earlier stages."""
        out = dict(self.fixed)
        return out | self.from_results(cfg, done) if self.from_results else out


def no_stages(*_: Any) -> list[Stage]:
    return []


@dataclass(frozen=True)
class AnalysisStages:
    """One analysis in the reproduction (``stage.py`` of its package ends with one): its
    stages, run once ``before`` the LM seeds, once ``per_seed`` (in that seed's group), or
    once ``after`` them, and ``results(cfg, done)``: its entries of results.json. The plan
    is every analysis's ``before``, then per seed every ``per_seed``, then every ``after``,
    in the order of ``knnlm.experiments.reproduce.ANALYSES``."""

    results: Callable[[Any, Done], dict]
    _: KW_ONLY
    before: Callable[[Any], list[Stage]] = no_stages
    per_seed: Callable[[int], list[Stage]] = no_stages
    after: Callable[[Any], list[Stage]] = no_stages


class ReadRecorder:
    """A read-only view of a settings dataclass that notes which of its fields are read.

    A property is evaluated on the view, so the fields it reads are noted (``cfg.seeds`` notes
    ``seed`` and ``lm_seeds``). Fields the settings class lists in ``NOT_IN_FINGERPRINT`` (where
    a run goes, not what it computes: processes, threads) are not noted."""

    def __init__(self, settings: Any):
        skip = getattr(type(settings), "NOT_IN_FINGERPRINT", frozenset())
        fields = {f.name for f in dataclasses.fields(settings)} - set(skip)
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str) -> Any:
        prop = getattr(type(self._settings), name, None)
        if isinstance(prop, property):
            return prop.fget(self)
        if name in self._fields:
            self.read.add(name)
        return getattr(self._settings, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a stage may not change the run's settings ({name})")

    def values(self) -> dict[str, Any]:
        """The fields read so far and their values."""
        return {name: getattr(self._settings, name) for name in sorted(self.read)}


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

    def run(
        self,
        name: str,
        settings: dict,
        deps: list[str],
        fn: Callable[[Any, Path], dict],
        config: Any,
    ) -> dict:
        """Stage ``name``: ``fn(view, artifacts)`` on a :class:`ReadRecorder` view of
        ``config``, or its cached result; ``settings`` are its own fixed settings."""
        self.index += 1
        if self.on_stage:
            self.on_stage(name, self.index, self.total)
        dep_fps = [self.fingerprints[d] for d in deps]
        record_file = self.out / "stages" / f"{name}.json"
        saved = _read_record(record_file)
        if saved is not None:
            read = {key: getattr(config, key, None) for key in saved.get("read", {})}
            if saved["fingerprint"] == fingerprint(settings, read, dep_fps):
                self.fingerprints[name] = saved["fingerprint"]
                rec = StageRecord(
                    name, saved["seconds"], True, saved["result"], saved.get("cpu_seconds")
                )
                self.records[name] = rec
                return rec.result
        view = ReadRecorder(config)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(view, self.artifacts(name))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        read = view.values()
        fp = self.fingerprints[name] = fingerprint(settings, read, dep_fps)
        write_json_atomic(
            record_file,
            {"fingerprint": fp, "read": read, "settings": settings, "seconds": seconds,
             "cpu_seconds": cpu, "result": result},
        )  # fmt: skip
        self.records[name] = StageRecord(name, seconds, False, result, cpu)
        return result

    def stage_times(self) -> dict[str, dict]:
        return {
            n: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "cached": r.cached}
            for n, r in self.records.items()
        }


def fingerprint(settings: dict, read: dict, deps: list[str]) -> str:
    """A stage's cache key: its fixed settings, the run's settings it read (name and value),
    the fingerprints of the stages it depends on."""
    stage = {"format": FORMAT_VERSION, "settings": settings, "read": read, "deps": deps}
    return short_sha256(canonical_json(stage))


def _read_record(path: Path) -> dict | None:
    """A stage's saved record of this format, or None (none, unreadable, older format)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("read"), dict):
        return None
    return saved if {"fingerprint", "seconds", "result"} <= set(saved) else None


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
