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
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from knnlm.experiments import natural_text as nt
from knnlm.experiments.hurdle import run_hurdle
from knnlm.experiments.hurdle_setup import hurdle_settings
from knnlm.experiments.macondo import contract_view, run_macondo
from knnlm.experiments.macondo_settings import MacondoSettings
from knnlm.experiments.parallel import first_failure, pool, submit
from knnlm.experiments.reproduce_config import PAPER_SETTING, ReproduceConfig
from knnlm.experiments.results_schema import check_results
from knnlm.experiments.stages import Pipeline, StageDisplay
from knnlm.experiments.width_study import rows_over_seeds, stage_width, width_row
from knnlm.fileio import claim_work_dir, write_json_atomic
from knnlm.lm.loading import pick_device, torch_threads
from knnlm.lm.presets import get_preset
from knnlm.locking import locks
from knnlm.provenance import provenance, utc_now

__all__ = ["reproduce", "not_run", "stage_plan", "Stage"]


def stage_macondo(
    cfg: ReproduceConfig, model: str | None, art: Path, sizes: dict | None = None
) -> dict:
    """Section 4: fine-tune ``model`` on Macondo, one dataset per seed generated with its
    tokenizer; per-n log-likelihood of the children (LM, kNN-LM, LM + MLP memory) on the test
    sentences, the LM's on the training sentences, and curves over fine-tuning steps.
    ``sizes`` replaces ``cfg.macondo_sizes`` (the second size's stage)."""
    settings = MacondoSettings.from_preset(
        cfg.macondo_preset,
        model=model,
        seeds=[cfg.seed + s for s in range(cfg.macondo_seeds)],
        k=cfg.k,
        knn_weight=PAPER_SETTING["knn_weight"],
        temperature=PAPER_SETTING["temperature"],
        epochs=cfg.macondo_epochs,
        lr=cfg.macondo_lr,
        eval_every=cfg.macondo_eval_every,
        sizes=cfg.macondo_sizes if sizes is None else sizes,
        memory=cfg.macondo_memory,
        tune=cfg.macondo_tune,
        workers=cfg.workers,
    )
    res = run_macondo(settings, art, progress=False)
    out = contract_view(res)
    out.update(
        groups=res["groups"],
        reproduced=res["reproduced"],
        settings=res["settings"],
        seconds=res["seconds"],
        figure1=str(art / res["files"]["figure1"]),
        table5=str(art / res["files"]["table"]),
    )
    if "figure3" in res["files"]:
        out["figure3"] = str(art / res["files"]["figure3"])
    return out


def stage_hurdle(cfg: ReproduceConfig, corpus: str | None, art: Path) -> dict:
    """Appendix E: with vs without the last MLP, Macondo log-likelihood (Figure 4) and the
    natural-text training loss (Figure 5), per seed, step 0 recorded."""
    settings = hurdle_settings(
        "full" if cfg.scale == "paper" else "quick",
        seeds=tuple(cfg.seed + s for s in range(cfg.hurdle_seeds)),
        steps=cfg.hurdle_steps,
        eval_every=cfg.hurdle_eval_every,
        corpus=corpus,
        corpus_max_chars=cfg.hurdle_corpus_max_chars,
        **cfg.hurdle_sizes,
    )
    res = run_hurdle(settings, art, progress=False)
    w, wo = res["with_mlp"], res["without_mlp"]
    loss = None
    if w.get("loss_eval_steps"):
        loss = {
            "steps": w["loss_eval_steps"],
            "with_mlp": w["loss_eval_per_seed"],
            "without_mlp": wo["loss_eval_per_seed"],
            "measured_on": "a fixed sample of training blocks (same for both variants)",
        }
    return {
        "seeds": res["settings"]["seeds"],
        "loglik": {
            "steps": w["steps"],
            "with_mlp": w["loglik_per_seed"],
            "without_mlp": wo["loglik_per_seed"],
        },
        "loss": loss,
        "figure4": str(art / "figure4.png"),
        "figure5": str(art / "figure5.png") if res["settings"]["corpus"] else None,
        "summary": res["summary"],
        "params": res["params"],
        "settings": res["settings"],
        "wall_seconds": res["wall_seconds"],
    }


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

# The results of the stages run so far, by stage name.
Done = dict[str, dict]


@dataclass(frozen=True)
class Stage:
    """One cached stage of the reproduction.

    ``name`` is its cache key. It runs as ``run(cfg, done, art, **args)``, where ``cfg`` is a
    view of the run's settings that notes the fields the stage reads: those fields and their
    values, the ``fixed`` settings, those ``from_results`` reads off earlier stages, and the
    fingerprints of the stages in ``deps`` make its fingerprint
    (:mod:`knnlm.experiments.stages`). The second process takes whole ``group``s.
    """

    name: str
    run: Callable[..., dict]
    _: KW_ONLY
    deps: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)
    from_results: Callable[[ReproduceConfig, Done], dict] | None = None
    group: str = "main"

    def settings(self, cfg: ReproduceConfig, done: Done) -> dict:
        """The stage's own settings: ``fixed`` and what it reads off earlier stages."""
        out = dict(self.fixed)
        return out | self.from_results(cfg, done) if self.from_results else out


def stage_plan(cfg: ReproduceConfig) -> list[Stage]:
    """Every stage of a reproduction, in the order one process runs them."""
    seed0 = cfg.seeds[0]
    at0 = {"seed": seed0}
    return [
        Stage("corpus", _run_corpus),
        *[stage for seed in cfg.seeds for stage in _seed_chain(seed)],
        Stage("projection", _run_projection, deps=(f"knnlm-{seed0}",),
              fixed=at0, args=at0 | {"lr_study": False}),
        Stage("projection_lr", _run_projection, deps=(f"knnlm-{seed0}",),
              fixed=at0, args=at0 | {"lr_study": True}),
        Stage("macondo", _run_macondo, deps=_macondo_deps(cfg),
              from_results=_macondo_settings),
        *([Stage("macondo-small", _run_macondo_small, deps=_macondo_deps(cfg),
                 from_results=_macondo_settings)] if cfg.macondo_small_sizes else []),
        *[Stage(_width_stage(d, s, seed0), _run_width, deps=("corpus",),
                fixed={"seed": s, "d": d}, args={"seed": s, "d": d})
          for d in _widths(cfg) for s in _width_seeds(cfg)
          if (d, s) != (_own_width(cfg), seed0)],
        Stage("hurdle", _run_hurdle, deps=("corpus",), group="hurdle",
              from_results=_hurdle_settings),
    ]  # fmt: skip


def _seed_chain(seed: int) -> list[Stage]:
    """Sections 2 and 5 for one LM seed: lm, datastore, knnlm, memory."""
    one, group = {"seed": seed}, f"seed-{seed}"
    return [
        Stage(f"lm-{seed}", _run_lm, deps=("corpus",), fixed=one, args=one,
              group=group),
        Stage(f"datastore-{seed}", _run_datastore, deps=(f"lm-{seed}",),
              args=one, group=group),
        Stage(f"knnlm-{seed}", _run_knnlm, deps=(f"datastore-{seed}",),
              args=one, group=group),
        Stage(f"memory-{seed}", _run_memory,
              deps=(f"datastore-{seed}", f"knnlm-{seed}"), fixed=one, args=one, group=group),
    ]  # fmt: skip


def second_process_groups(cfg: ReproduceConfig) -> list[str]:
    """With 2 workers a second process takes Appendix E and every other LM seed from seed 1,
    in that order."""
    if cfg.workers <= 1:
        return []
    return ["hurdle", *[f"seed-{s}" for s in cfg.seeds[1::2]]]


def _widths(cfg: ReproduceConfig) -> list[int]:
    return sorted({int(x) for x in cfg.width_study or ()})


def _width_seeds(cfg: ReproduceConfig) -> list[int]:
    return [cfg.seed + s for s in range(cfg.width_seeds)]


def _width_stage(d: int, seed: int, seed0: int) -> str:
    """``width-D`` for the first seed (the quick run's one), ``width-D-seed-S`` for others."""
    return f"width-{d}" if seed == seed0 else f"width-{d}-seed-{seed}"


def _own_width(cfg: ReproduceConfig) -> int | None:
    """The width of the run's own LM (its row of the width study), when it trains one."""
    return get_preset(cfg.lm_preset).n_embd if cfg.model is None else None


def _macondo_model(cfg: ReproduceConfig, done: Done) -> str | None:
    """Section 4 fine-tunes the first LM of this run (the paper fine-tunes GPT-2); at paper
    scale it is the given --model or GPT-2 XL."""
    return done[f"lm-{cfg.seeds[0]}"]["model"] if cfg.scale != "paper" else cfg.model


def _macondo_settings(cfg: ReproduceConfig, done: Done) -> dict:
    return {"model": _macondo_model(cfg, done)}


def _hurdle_settings(cfg: ReproduceConfig, done: Done) -> dict:
    return {"corpus": done["corpus"]["corpus"]}


def _macondo_deps(cfg: ReproduceConfig) -> tuple[str, ...]:
    """The first LM's stage, when Section 4 fine-tunes that LM (at paper scale: when it is the
    given --model, which that stage passes through)."""
    return (f"lm-{cfg.seeds[0]}",) if cfg.scale != "paper" or cfg.model is not None else ()


# What each stage runs, from the results of the stages before it.


def _run_corpus(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return nt.stage_corpus(cfg, art)


def _run_lm(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    corpus = done["corpus"]
    return nt.stage_lm(cfg, seed, corpus["corpus"], corpus["tokenizer"], art)


def _run_datastore(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    return nt.stage_datastore(cfg, seed, done[f"lm-{seed}"]["model"], done["corpus"]["corpus"], art)


def _run_knnlm(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    model, corpus, ds = _seed_inputs(done, seed)
    return nt.stage_knnlm(cfg, model, corpus, ds, art, seed=seed)


def _run_memory(cfg: ReproduceConfig, done: Done, art: Path, seed: int) -> dict:
    model, corpus, ds = _seed_inputs(done, seed)
    return nt.stage_memory(cfg, seed, model, corpus, ds, done[f"knnlm-{seed}"], art)


def _run_projection(cfg: ReproduceConfig, done: Done, art: Path, seed: int, lr_study: bool) -> dict:
    model, corpus, ds = _seed_inputs(done, seed)
    tuned = done[f"knnlm-{seed}"]["tuned"]
    return nt.stage_projection(cfg, seed, model, corpus, ds, tuned, art, lr_study=lr_study)


def _run_macondo(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_macondo(cfg, _macondo_model(cfg, done), art)


def _run_macondo_small(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_macondo(cfg, _macondo_model(cfg, done), art, sizes=cfg.macondo_small_sizes)


def _run_width(cfg: ReproduceConfig, done: Done, art: Path, seed: int, d: int) -> dict:
    return stage_width(cfg, d, seed, done["corpus"], art)


def _run_hurdle(cfg: ReproduceConfig, done: Done, art: Path) -> dict:
    return stage_hurdle(cfg, done["corpus"]["corpus"], art)


def _seed_inputs(done: Done, seed: int) -> tuple[str, str, str]:
    """One LM seed's model, the corpus, and that LM's datastore."""
    return (
        done[f"lm-{seed}"]["model"],
        done["corpus"]["corpus"],
        done[f"datastore-{seed}"]["datastore"],
    )


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
    seeds = cfg.seeds
    results = {
        "config": asdict(cfg),
        "corpus": done["corpus"],
        "lm": [done[f"lm-{s}"] for s in seeds],
        "datastore": [done[f"datastore-{s}"] for s in seeds],
        "knnlm": _knnlm_results(seeds, done),
        "projection": {"lr_0.1": done["projection"], "lr_0.001": done["projection_lr"]},
        "memory": _memory_results(cfg, seeds, done),
        "macondo": done["macondo"],
        "hurdle": done["hurdle"],
        "not_run": not_run(cfg),
    }
    if cfg.width_study:
        results["width_study"] = _width_study(cfg, done)
    if "macondo-small" in done:
        results["macondo_small"] = done["macondo-small"]
    return results


def _knnlm_results(seeds: list[int], done: Done) -> dict:
    first = done[f"knnlm-{seeds[0]}"]
    return {
        "seeds": seeds,
        "paper_setting": dict(PAPER_SETTING),
        "per_seed": [
            {"seed": s, **{k: done[f"knnlm-{s}"][k] for k in ("tuned", "valid", "test", "figure")}}
            for s in seeds
        ],
        "sweep": first["sweep"],
        "figure": first["figure"],
        "settings": first["settings"],
    }


def _memory_results(cfg: ReproduceConfig, seeds: list[int], done: Done) -> dict:
    keep = ("seed", "weight", "valid", "test", "weight_sweep", "train", "control")
    return {
        "seeds": seeds,
        "per_seed": [{k: done[f"memory-{s}"].get(k) for k in keep} for s in seeds],
        "storage": done[f"memory-{seeds[0]}"]["storage"],
        "settings": {
            "hidden": cfg.memory_hidden,
            "epochs": cfg.memory_epochs,
            "lr": cfg.memory_lr,
            "batch_tokens": cfg.memory_batch_tokens,
            "max_steps": cfg.memory_max_steps,
            "weights": cfg.memory_weights,
            "weight_tuned_on": "valid",
        },
    }


def _width_study(cfg: ReproduceConfig, done: Done) -> dict:
    """Section 3 at each width of ``cfg.width_study``; the run's own LM is its width's row."""
    main, seed0 = done["projection"], cfg.seeds[0]
    own = width_row(_own_width(cfg) or 0, main) | {"tuned": main.get("tuned"), "main_lm": True}
    rows = [
        rows_over_seeds([(s, own if (d, s) == (_own_width(cfg), seed0)
                             else done[_width_stage(d, s, seed0)]) for s in _width_seeds(cfg)])
        for d in _widths(cfg)
    ]  # fmt: skip
    return {"seed": seed0, "seeds": _width_seeds(cfg), "preset": cfg.lm_preset, "rows": rows}
