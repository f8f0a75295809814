"""``knnlm.KnnLM``: any Hugging Face causal LM as a kNN-LM in a few lines.

Example::

    from knnlm import KnnLM, Datastore
    knn_lm = KnnLM.from_pretrained("gpt2")
    ds = Datastore.build(knn_lm, "data/wikitext-2", "runs/ds")
    print(knn_lm.perplexity("data/wikitext-2", ds, k=1024))
    print(knn_lm.generate(["The tower is"], datastore=ds, max_new_tokens=20))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knnlm.data.corpus import Corpus, pick_split
from knnlm.errors import KnnlmError
from knnlm.evaluate import EvalSettings, run_eval
from knnlm.experiments.mlp_memory.settings import MemoryTrainSettings
from knnlm.experiments.mlp_memory.train import MemoryTrainResult, train_memory
from knnlm.experiments.projection.run import run_projection
from knnlm.experiments.projection.settings import PROJECTION_ARGS, ProjectionSettings
from knnlm.forward_pass import WindowSettings, position_limit
from knnlm.frontier import load_tuned_settings, merge_settings
from knnlm.generation import KnnLogitsProcessor, attach_processor, generate
from knnlm.lm import loading
from knnlm.lm.loading import LoadedLM, pick_device, torch_dtype, wrap_lm
from knnlm.retrieval.datastore import Datastore, datastore_record
from knnlm.retrieval.gate import Gate
from knnlm.retrieval.retriever import KNN_ARGS, MIX_ARGS, KnnSettings, MixSettings, Retriever
from knnlm.retrieved_entries import find_neighbours
from knnlm.settings import build

DatastoreLike = Datastore | str | Path


def _knn_settings(k: int, **rest: Any) -> KnnSettings:
    """KnnSettings from the Python arguments, each mistake named as the Python argument."""
    return build(KnnSettings, KNN_ARGS, k=k, **rest)


def _mix_settings(knn_weight: float, knn_temperature: float, **rest: Any) -> MixSettings:
    """MixSettings from the Python arguments, each mistake named as the Python argument."""
    return build(MixSettings, MIX_ARGS, knn_weight=knn_weight, temperature=knn_temperature,
                 **rest)  # fmt: skip


def _open(datastore: DatastoreLike | None, k: int) -> Datastore | None:
    """The datastore opened (once), with ``k`` checked against its size."""
    if datastore is None:
        return None
    ds = datastore if isinstance(datastore, Datastore) else Datastore.load(datastore)
    ds.check_k(k)
    return ds


# The defaults of the arguments a settings file can set (``knnlm tune --out``).
_TUNABLE = {"datastore": None, "k": 1024, "knn_weight": 0.25, "knn_temperature": 1.0,
            "nprobe": None, "search": "auto", "pointers": None, "gate": None,
            "retrieval_rate": 1.0}  # fmt: skip


def _with_settings(settings: str | Path | None, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the settings file's values put in; an argument passed with a value other
    than its default that disagrees with the file is refused (named as in Python)."""
    if settings is None:
        return args
    file = {key: _folder(key, v) for key, v in load_tuned_settings(settings).items()}
    given = {key: _folder(key, v) for key, v in args.items()
             if v is not _TUNABLE[key] and v != _TUNABLE[key]}  # fmt: skip
    merged = {**args, **merge_settings(file, given, {key: key for key in args}, settings)}
    if merged.get("retrieval_rate") is None and "retrieval_rate" in args:
        merged["retrieval_rate"] = 1.0  # the file's "no gate"
    for key in set(merged) - set(args):
        if merged[key] is not None:
            raise KnnlmError(f"settings {settings}: {key} = {merged[key]} is not taken here")
    return {key: merged[key] for key in args}


def _folder(key: str, v: Any) -> Any:
    """A datastore or gate as its absolute folder, so that equal ones compare equal."""
    if key not in ("datastore", "gate") or v is None or isinstance(v, Gate):
        return v
    return str(Path(v.path if isinstance(v, Datastore) else v).resolve())


@dataclass(repr=False)
class PerplexityResult:
    """LM (and kNN-LM) perplexity with the settings that produced it.

    ``to_dict()`` has the keys of ``knnlm eval --json``. Example::

        res = knn_lm.perplexity(["a b c", "d e f"], ds)
        res.lm, res.knnlm, res.tokens, res.to_dict()["settings"]["context_len"]
    """

    lm: float
    knnlm: float | None
    tokens: int
    settings: dict
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_eval(cls, result: dict) -> PerplexityResult:
        """From the dict of ``knnlm.evaluate.evaluate``; e.g. ``from_eval(evaluate(lm, ...))``."""
        knn = result.get("knnlm")
        return cls(
            lm=result["lm"]["perplexity"],
            knnlm=knn["perplexity"] if knn else None,
            tokens=result["tokens"],
            settings=result["settings"],
            raw=result,
        )

    def to_dict(self) -> dict:
        """The result as ``knnlm eval --json`` writes it; e.g. ``to_dict()["lm"]["nll_sum"]``."""
        return dict(self.raw)

    def __repr__(self) -> str:
        s = self.settings
        text = f"PerplexityResult(tokens={self.tokens}, lm={self.lm:.3f}"
        if self.knnlm is not None:
            text += (
                f", knnlm={self.knnlm:.3f}, k={s['k']}, knn_weight={s['knn_weight']}, "
                f"knn_temperature={s['temperature']}"
            )
        return text + f", context_len={s['context_len']}, stride={s['stride']})"


class KnnLM:
    """A causal LM with its tokenizer, ready for datastores, kNN-LM perplexity and generation.

    ``KnnLM(model, tokenizer)`` wraps a model already in memory (any device and dtype;
    ``device=`` / ``dtype=`` move it). Its fingerprint, which datastores, memories and gates
    record, is a hash of every weight and the config: the same weights have the same one
    whether they were built in memory, saved to a folder or loaded from the hub. ``name``
    (default: the folder or hub name the model came from, if any) is what artifacts record to
    reload it. Example::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("gpt2")
        knn_lm = KnnLM(model, AutoTokenizer.from_pretrained("gpt2"))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        if dtype is not None:
            model.to(torch_dtype(dtype))
        if device is not None:
            model.to(pick_device(device))
        self.lm: LoadedLM = wrap_lm(model, tokenizer, name)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        **hf_kwargs: Any,
    ) -> KnnLM:
        """Load a hub model or a ``save_pretrained`` folder (model and tokenizer).

        ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``revision``).
        Example: ``KnnLM.from_pretrained("gpt2", device="cuda", dtype="bfloat16")``.
        """
        self = cls.__new__(cls)
        self.lm = loading.load_lm(name_or_path, device, dtype, trust_remote_code, **hf_kwargs)
        return self

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped causal LM (eval mode); e.g. ``knn_lm.model.generate(...)``."""
        return self.lm.model

    @property
    def tokenizer(self) -> Any:
        """Its tokenizer; e.g. ``knn_lm.tokenizer("text", return_tensors="pt")``."""
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; e.g. ``torch.device("cpu")``."""
        return self.lm.device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model reads (the default context length); e.g. 1024."""
        limit = position_limit(self.model)
        return limit[0] if limit else None

    def __repr__(self) -> str:
        return (
            f"KnnLM({self.lm.name!r}, type={self.lm.adapter.model_type!r}, "
            f"device={self.device}, fingerprint={self.lm.fingerprint!r})"
        )

    def perplexity(
        self,
        corpus: Corpus,
        datastore: DatastoreLike | None = None,
        *,
        k: int = 1024,
        knn_weight: float = 0.25,
        knn_temperature: float = 1.0,
        context_len: int | None = None,
        stride: int | None = None,
        split: str | None = None,
        batch_size: int = 8,
        text_field: str = "text",
        nprobe: int | None = None,
        recompute: bool = True,
        exclude_self: str = "auto",
        search: str = "auto",
        memory: str | Path | None = None,
        memory_weight: float = 0.25,
        gate: str | Path | Gate | None = None,
        retrieval_rate: float = 1.0,
        gate_weight: str = "fixed",
        progress: bool = False,
        pointers: float | None = None,
        settings: str | Path | None = None,
    ) -> PerplexityResult:
        """LM perplexity of ``corpus``, and the kNN-LM's when a datastore is given.

        ``pointers``: RetoMaton's threshold (``knnlm.retrieval.pointers``); the share of
        searches saved is ``to_dict()["knnlm"]["searches_saved"]``.
        ``knn_weight`` is the weight on p_knn (the paper's lambda is 1 - knn_weight);
        ``context_len`` defaults to the model's maximum positions, ``stride`` to half of it.
        ``memory`` (a folder from :meth:`train_memory`) adds the LM + MLP memory perplexity
        (``memory_weight`` on it, in ``raw["mlp"]``); ``gate`` (a folder from ``knnlm gate
        train``) searches only the share ``retrieval_rate`` of the tokens it ranks highest.
        ``settings``: a file of ``knnlm tune --out`` (its datastore, k, weights, search,
        pointers, gate); an argument given beside it with another value is refused.
        Example: ``knn_lm.perplexity("data/wikitext-2", ds, k=1024).knnlm``.
        """
        t = _with_settings(settings, dict(
            datastore=datastore, k=k, knn_weight=knn_weight, knn_temperature=knn_temperature,
            nprobe=nprobe, search=search, pointers=pointers, gate=gate,
            retrieval_rate=retrieval_rate))  # fmt: skip
        datastore, k, knn_weight, knn_temperature = (t[n] for n in ("datastore", "k", "knn_weight",
                                                                    "knn_temperature"))  # fmt: skip
        nprobe, search, pointers = t["nprobe"], t["search"], t["pointers"]
        gate, retrieval_rate = t["gate"], t["retrieval_rate"]
        knn = _knn_settings(k, recompute=recompute, nprobe=nprobe, exclude_self=exclude_self,
                            search=search)  # fmt: skip
        mix = _mix_settings(knn_weight, knn_temperature, memory=memory,
                            memory_weight=memory_weight, gate=gate,
                            retrieval_rate=retrieval_rate, gate_weight=gate_weight,
                            pointers=pointers)  # fmt: skip
        if gate is not None and datastore is None:
            raise KnnlmError("gate needs a datastore (it decides which tokens search it)")
        window = WindowSettings(context_len, stride).for_model(self.model)
        run = EvalSettings(pick_split(corpus, split, "valid"), window, batch_size, text_field,
                           knn, mix)  # fmt: skip
        result = run_eval(self.lm, corpus, run, datastore=_open(datastore, k), progress=progress)
        return PerplexityResult.from_eval(result)

    def project(
        self,
        corpus: Corpus,
        datastore: DatastoreLike,
        *,
        split: str | None = None,
        k: int = 1024,
        knn_weight: float = 0.25,
        knn_temperature: float = 1.0,
        context_len: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        max_positions: int | None = 2000,
        seed: int = 0,
        lr: float = 0.1,
        tol: float = 1e-3,
        max_steps: int = 500,
        steps: int | None = None,
        solve_batch: int = 256,
        nprobe: int | None = None,
        search: str = "auto",
        text_field: str = "text",
        progress: bool = False,
    ) -> dict:
        """Project p_knnlm onto the output space of f and of f∘g (the paper's Eq. 2).

        The same defaults as ``knnlm project``: ``context_len`` the model's maximum
        positions, ``stride`` half of it, a seeded sample of ``max_positions`` positions
        (None: all), Adam at ``lr`` until the KL moves less than ``tol`` (or ``steps``
        fixed steps). The dict is what ``knnlm project --json`` writes. Example::

            res = knn_lm.project("data/wikitext-2", ds, k=1024, max_positions=500)
            res["proj_f"]["perplexity"], res["proj_fg"]["perplexity"]
        """
        knn = _knn_settings(k, nprobe=nprobe, search=search)
        mix = _mix_settings(knn_weight, knn_temperature)
        settings = build(
            ProjectionSettings, PROJECTION_ARGS, split=pick_split(corpus, split, "valid"),
            window=WindowSettings(context_len, stride),  # run_projection fills it in
            batch_size=batch_size, knn=knn, mix=mix, max_positions=max_positions or None, seed=seed,
            lr=lr, tol=tol, max_steps=max_steps, fixed_steps=steps, solve_batch=solve_batch,
            text_field=text_field,
        )  # fmt: skip
        return run_projection(self.lm, corpus, _open(datastore, k), settings, progress=progress)

    def train_memory(
        self,
        datastore: DatastoreLike,
        out: str | Path,
        *,
        hidden: int = 4096,
        epochs: int = 1,
        lr: float = 1e-5,
        batch_tokens: int = 9216,
        max_steps: int | None = None,
        micro_batch: int | None = None,
        train_output: bool = False,
        seed: int = 0,
        overwrite: bool = False,
        progress: bool = False,
    ) -> MemoryTrainResult:
        """Train the MLP memory of the paper's Section 5 on ``datastore``'s keys -> next tokens.

        W starts as this model's output embedding (frozen unless ``train_output``); the
        defaults are ``knnlm memory train``'s. Use it with ``perplexity(..., memory=out)``.
        Example: ``knn_lm.train_memory(ds, "runs/mem", hidden=256, max_steps=100)``.
        """
        settings = MemoryTrainSettings(
            hidden=hidden, lr=lr, batch_tokens=batch_tokens, epochs=epochs, max_steps=max_steps,
            seed=seed, train_output=train_output, micro_batch=micro_batch,
        )  # fmt: skip
        ds = datastore if isinstance(datastore, Datastore) else Datastore.load(datastore)
        ds.check_compatible(self.lm)
        return train_memory(
            ds.keys, ds.values, self.lm.adapter.output_embedding.detach(), out, settings,
            device=self.device, progress=progress, overwrite=overwrite,
            datastore=datastore_record(ds),
        )  # fmt: skip

    def generate(
        self,
        prompts: str | list[str],
        datastore: DatastoreLike | None = None,
        *,
        k: int = 1024,
        knn_weight: float = 0.25,
        knn_temperature: float = 1.0,
        nprobe: int | None = None,
        search: str = "auto",
        seed: int | None = None,
        pointers: float | None = None,
        settings: str | Path | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One continuation string per returned sequence, in prompt order.

        ``settings``: a file of ``knnlm tune --out`` (without a gate), as in :meth:`perplexity`.

        Every ``model.generate`` argument passes through (``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``num_beams``, ``num_return_sequences``, ``max_new_tokens``).
        Example: ``knn_lm.generate(["The tower"], ds, do_sample=True, top_p=0.9)``.
        """
        t = _with_settings(settings, dict(
            datastore=datastore, k=k, knn_weight=knn_weight, knn_temperature=knn_temperature,
            nprobe=nprobe, search=search, pointers=pointers))  # fmt: skip
        datastore, k, knn_weight, knn_temperature = (t[n] for n in ("datastore", "k", "knn_weight",
                                                                    "knn_temperature"))  # fmt: skip
        nprobe, search, pointers = t["nprobe"], t["search"], t["pointers"]
        knn = _knn_settings(k, nprobe=nprobe, search=search)
        mix = _mix_settings(knn_weight, knn_temperature, pointers=pointers)
        ds = _open(datastore, k)
        return generate(self.lm, prompts, ds, knn, mix, seed=seed, **generate_kwargs)

    def logits_processor(
        self,
        datastore: DatastoreLike,
        *,
        k: int = 1024,
        knn_weight: float = 0.25,
        knn_temperature: float = 1.0,
        nprobe: int | None = None,
        recompute: bool = True,
        search: str = "auto",
    ) -> KnnLogitsProcessor:
        """A logits processor for your own ``model.generate(...)``; its hooks attach now.

        Leaving a ``with`` block (or ``.close()``) removes them. Example::

            with knn_lm.logits_processor(ds, k=16) as proc:
                out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]))
        """
        knn = _knn_settings(k, recompute=recompute, nprobe=nprobe, search=search)
        mix = _mix_settings(knn_weight, knn_temperature)
        return attach_processor(self.lm, _open(datastore, k), knn, mix)

    def neighbours(
        self,
        text: str,
        datastore: DatastoreLike,
        k: int = 8,
        *,
        knn_temperature: float = 1.0,
        context_tokens: int = 32,
        nprobe: int | None = None,
        search: str = "auto",
    ) -> list[dict[str, Any]]:
        """The datastore entries retrieved for the token after ``text``, nearest first.

        Each is a dict: ``context`` (up to ``context_tokens`` tokens of the row's preceding
        text), ``target`` (its next token), ``distance`` (as p_knn uses it) and ``weight``
        (its share of p_knn), plus ``row``. Example::

            for nb in knn_lm.neighbours("The tower is", ds, k=4):
                print(f"{nb['weight']:.2f} {nb['context']!r} -> {nb['target']!r}")
        """
        ds = _open(datastore, k)
        knn = _knn_settings(k, nprobe=nprobe, exclude_self="no", search=search)
        mix = _mix_settings(0.25, knn_temperature)
        retriever = Retriever(self.lm, ds, knn)
        return find_neighbours(self.lm, retriever, ds.tokens(self.tokenizer), text, context_tokens,
                               temperature=mix.temperature)  # fmt: skip
