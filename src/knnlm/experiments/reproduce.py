"""``knnlm reproduce``: every analysis of the paper, end to end.

The pipeline composes the library; it re-implements nothing. Its stages (cached, see
:mod:`knnlm.experiments.stages`) are the entries of :func:`stage_plan`, in order:

1. ``corpus``: the natural text (the embedded WikiText-2 slice at quick scale) and a tokenizer;
2. per LM seed: ``lm-S``, ``datastore-S``, ``knnlm-S`` (Section 2: tuned on valid, read on
   test), ``memory-S`` (Section 5);
3. ``projection`` / ``projection_lr`` (Section 3, first seed, test split, tuned setting);
4. ``macondo`` (Section 4: the first seed's LM fine-tuned on Macondo, one dataset per seed),
   and at corpus scale ``macondo-small`` (the same at the quick scale's Macondo size);
5. ``width-D`` (Section 3 at other model widths, with ``--width-study``);
6. ``hurdle`` (Appendix E: Figure 4 on Macondo, Figure 5 on the natural text).

``results.json`` has the shape of :mod:`knnlm.experiments.results_schema` (``knnlm``,
``projection``, ``memory``, ``macondo``, ``hurdle``, ``not_run``, ``config``, ``stages``,
``wall_seconds``, ``provenance``: versions, commit, machine and UTC times, see
:mod:`knnlm.provenance`), checked before it is written.
This module computes and saves; the report layer draws the figures, the claims and the
report from those results.
Settings and scales: :mod:`knnlm.experiments.reproduce_config`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from knnlm.experiments.hurdle import stage as hurdle
from knnlm.experiments.macondo import stage as macondo
from knnlm.experiments.mlp_memory import stage as mlp_memory
from knnlm.experiments.natural_text import stage as natural_text
from knnlm.experiments.parallel import first_failure, pool, submit
from knnlm.experiments.projection import stage as projection
from knnlm.experiments.reproduce_config import ReproduceConfig
from knnlm.experiments.results_schema import check_results
from knnlm.experiments.stages import AnalysisStages, Done, Pipeline, Stage, StageDisplay
from knnlm.experiments.width_study import stage as width_study
from knnlm.fileio import claim_work_dir, write_json_atomic
from knnlm.lm.loading import pick_device, torch_threads
from knnlm.locking import locks
from knnlm.provenance import provenance, utc_now

__all__ = ["reproduce", "not_run", "stage_plan", "Stage"]


def not_run(cfg: ReproduceConfig) -> list[dict]:
    """What the paper has and this run does not, why, and the command that would do it."""
    out = [
        {
            "what": "Figure 2: GPT-3.5 Turbo fine-tuned on Macondo-Conv",
            "why": "a hosted chat model fine-tuned through the OpenAI API: needs an account, "
            "network access and paid fine-tuning; nothing here can reach it",
            "command": "knnlm macondo generate --conv --seed S --out macondo-conv-S  # S = 0..4; "
            "fine-tune on its chat JSONL through the API and read the test loss",
        },
    ]
    if cfg.scale != "paper":
        out += [
            {
                "what": "Figures 1 and 3 with GPT-2 XL and Mistral-7B (Section 4, App. C.1)",
                "why": "needs the pretrained weights (no model hub here) and a GPU",
                "command": "knnlm macondo run --model gpt2-xl --preset paper-gpt2 --seeds 5 "
                "--eval-every 1000 --out macondo-gpt2xl  # and --model "
                "mistralai/Mistral-7B-v0.1 --preset paper-mistral",
            },
            {
                "what": "Sections 2, 3, 5 at paper scale (WikiText-103, 16-layer LM, k=1024)",
                "why": "WikiText-103 (540 MB) and the 247M-parameter LM need a GPU and days of "
                "CPU time; this run uses "
                + ("the embedded WikiText-2 slice" if cfg.corpus is None else cfg.corpus),
                "command": "knnlm reproduce --scale paper --model PATH_TO_TRAINED_LM --out "
                "reproduction-paper",
            },
        ]
    return out


@locks("out", "reproduction")
def reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool = True) -> dict:
    """Run every stage (or reuse cached ones) and write ``results.json``; the report layer
    writes the report from it. Returns its content."""
    with torch_threads(cfg.torch_threads):
        return _reproduce(cfg, out, progress)


# ----------------------------------------------------------------------------- stage registry

# Every analysis of the reproduction, one line each (its package's stage.py): the plan runs
# their stages in this order and results.json holds their entries.
ANALYSES: list[AnalysisStages] = [
    natural_text.STAGES,
    mlp_memory.STAGES,
    projection.STAGES,
    macondo.STAGES,
    width_study.STAGES,
    hurdle.STAGES,
]


def stage_plan(cfg: ReproduceConfig) -> list[Stage]:
    """Every stage of a reproduction, in the order one process runs them: each analysis's
    ``before`` stages, then per LM seed each one's ``per_seed`` stages, then the ``after``s."""
    return [
        *[st for a in ANALYSES for st in a.before(cfg)],
        *[st for seed in cfg.seeds for a in ANALYSES for st in a.per_seed(seed)],
        *[st for a in ANALYSES for st in a.after(cfg)],
    ]


def second_process_groups(cfg: ReproduceConfig) -> list[str]:
    """With 2 workers a second process takes Appendix E and every other LM seed from seed 1,
    in that order."""
    if cfg.workers <= 1:
        return []
    return ["hurdle", *[f"seed-{s}" for s in cfg.seeds[1::2]]]


# ----------------------------------------------------------------------------- running


def run_stages(
    pipe: Pipeline,
    cfg: ReproduceConfig,
    stages: list[Stage],
    done: Done,
    check: Callable[[], None] | None = None,
) -> None:
    """Run (or read back from the cache) each of ``stages`` in order, into ``done``; ``check``
    before each (it raises to stop the run)."""
    for st in stages:
        if check is not None:
            check()
        done[st.name] = pipe.run(
            st.name, st.settings(cfg, done), list(st.deps), partial(_call, st, done), cfg
        )


def _call(st: Stage, done: Done, cfg: ReproduceConfig, art: Path) -> dict:
    return st.run(cfg, done, art, **st.args)


def _with_deps(plan: list[Stage], stages: list[Stage]) -> list[Stage]:
    """``stages`` and every stage they depend on, directly or not, in the order of ``plan``."""
    by_name = {st.name: st for st in plan}
    need = {st.name for st in stages}
    for st in reversed(plan):
        if st.name in need:
            need.update(st.deps)
    return [by_name[name] for name in by_name if name in need]


def _worker(cfg: ReproduceConfig, out: Path, groups: list[str]) -> list[str]:
    """The second process's share: the stages of ``groups``, group by group, into the same
    stage cache (each stage its own files); returns the stages it ran. The stages they depend
    on outside those groups were run by the main process first: here they are read, not rerun."""
    with torch_threads(cfg.torch_threads):
        pipe = Pipeline(out)
        plan = stage_plan(cfg)
        ours = [st for group in groups for st in plan if st.group == group]
        needed = [st for st in _with_deps(plan, ours) if st.group not in groups]
        run_stages(pipe, cfg, needed + ours, {})
    return [n for n, rec in pipe.records.items() if not rec.cached]


def _run_plan(pipe: Pipeline, cfg: ReproduceConfig, out: Path) -> tuple[Done, list[str]]:
    """Every stage of :func:`stage_plan`; with a second process, its groups there. Returns the
    results by stage and the stages the second process ran."""
    plan = stage_plan(cfg)
    pipe.total = len(plan)
    groups = second_process_groups(cfg)
    second = [st for st in plan if st.group in groups]
    # What the second process's stages need from outside its groups runs here first.
    before = {st.name for st in _with_deps(plan, second)} - {st.name for st in second}
    done: Done = {}
    run_stages(pipe, cfg, [st for st in plan if st.name in before], done)
    here = [st for st in plan if st.name not in before and st.group not in groups]
    if not second:
        run_stages(pipe, cfg, here, done)
        return done, []
    # The worker dies with this process; an error here (or a Ctrl-C) kills it, and its own
    # error stops this process at its next stage.
    with pool(1) as ex:
        job = submit(ex, _worker, (cfg, out, groups), cfg.torch_threads)
        run_stages(pipe, cfg, here, done, check=partial(first_failure, [job]))
        ran_there = job.result()
    run_stages(pipe, cfg, second, done)  # computed there: read back here
    for name in ran_there:  # computed in this invocation, by the other process
        pipe.records[name].cached = False
    return done, ran_there


def _reproduce(cfg: ReproduceConfig, out: str | Path, progress: bool) -> dict:
    # Resumes a reproduction of ours; a folder of the user's own files is refused, untouched.
    out = claim_work_dir(Path(out).expanduser(), "reproduction")
    t_start = time.perf_counter()
    started = utc_now()
    display = StageDisplay(progress)
    pipe = Pipeline(out, on_stage=display.update)
    try:
        done, ran_there = _run_plan(pipe, cfg, out)
    finally:
        display.close()
    results = _assemble(cfg, done)
    results["stages"] = pipe.stage_times()
    results["wall_seconds"] = time.perf_counter() - t_start
    results["workers"] = {"processes": cfg.workers, "second_process_ran": ran_there}
    # Outside every stage key: a resumed run on another machine still reuses its stages.
    results["provenance"] = provenance(
        started=started, threads=torch.get_num_threads(), device=str(pick_device())
    )
    check_results(results)  # a departure from the report's shape is a bug: fail before writing
    write_json_atomic(out / "results.json", results)
    return json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- results.json


def _assemble(cfg: ReproduceConfig, done: Done) -> dict:
    """results.json in the schema's shape (lists per seed, in the order of ``cfg.seeds``)."""
    results = {"config": asdict(cfg)}
    for analysis in ANALYSES:
        results |= analysis.results(cfg, done)
    results["not_run"] = not_run(cfg)
    return results
