"""Evaluation through a FAISS index against numpy brute force and FAISS's own search.

The default production path is an index: these tests check that a flat index gives the exact
kNN-LM, that IVF-PQ with re-ranking uses exact distances of the retrieved ids, that
``recompute=False`` uses the index's PQ distances, and that ``nprobe`` reaches the search.
"""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
import torch

from knnlm.data.corpus import load_tokens
from knnlm.data.windows import make_windows
from knnlm.evaluate import evaluate
from knnlm.lm.loading import load_lm
from knnlm.neighbour_cache import load_cache
from knnlm.retrieval.datastore import build_datastore, open_datastore
from knnlm.retrieval.retriever import KnnSettings
from knnlm.retrieval.search.index_build import build_index

CTX = 32
NLIST = 16


def reference_queries(model, ids, ctx, stride=None):
    """Per target: ffn_input key (hook on the last block's ln_2), log p_lm(target), target.

    One batch-1 forward per window over exactly its tokens (no padding, no batching)."""
    grabbed = {}
    handle = model.transformer.h[-1].ln_2.register_forward_hook(
        lambda m, a, o: grabbed.__setitem__("k", o)
    )
    keys, lps, targets = [], [], []
    with torch.no_grad():
        for w in make_windows(len(ids), ctx, stride):
            x = torch.tensor(ids[w.begin : w.end])[None]
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            cols = np.arange(w.score_from - w.begin - 1, w.length - 1)
            tg = ids[w.score_from : w.end]
            keys.append(grabbed["k"][0, cols].double().numpy())
            lps.append(logp[cols, tg].numpy())
            targets.append(np.asarray(tg))
    handle.remove()
    return np.concatenate(keys), np.concatenate(lps), np.concatenate(targets)


def brute_force_knn(q, keys, k):
    """(squared L2 distances, ids) of the k nearest rows of ``keys``, float64, ascending."""
    d = ((q**2).sum(1)[:, None] - 2 * q @ keys.T + (keys**2).sum(1)[None, :]).clip(min=0)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def knnlm_ppl(dists, ids, values, lm_lp, targets, w, temp):
    """exp(mean NLL) of log((1 - w) p_lm + w p_knn) from given neighbours (ids -1 skipped)."""
    logits = np.where(ids >= 0, -np.asarray(dists, np.float64) / temp, -np.inf)
    logits -= logits.max(1, keepdims=True)
    wts = np.exp(logits)
    wts /= wts.sum(1, keepdims=True)
    hit = (values[np.where(ids >= 0, ids, 0)] == targets[:, None]) & (ids >= 0)
    p_knn = (wts * hit).sum(1)
    p = (1 - w) * np.exp(lm_lp) + w * p_knn
    return float(np.exp(-np.log(p).mean()))


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tiny_corpus, tmp_path_factory):
    lm = load_lm(str(tiny_lm_dir))
    root = tmp_path_factory.mktemp("idx")
    plain = build_datastore(
        lm,
        str(tiny_corpus),
        "train",
        root / "plain",
        context_len=CTX,
        key_dtype="float32",
        batch_size=16,
        progress=False,
    )
    flat = root / "flat"
    shutil.copytree(plain, flat)
    build_index(flat, "flat", use_gpu=False, progress=False)
    ivf = root / "ivfpq"
    shutil.copytree(plain, ivf)
    build_index(
        ivf, "ivfpq", nlist=NLIST, pq_m=4, pq_bits=6, nprobe=4, use_gpu=False, progress=False
    )
    ds = open_datastore(plain)
    ids = load_tokens(lm.tokenizer, str(tiny_corpus), "valid")
    q, lps, targets = reference_queries(lm.model, ids, CTX)
    return {
        "lm": lm,
        "corpus": str(tiny_corpus),
        "plain": plain,
        "flat": flat,
        "ivf": ivf,
        "keys": np.asarray(ds.keys, dtype=np.float64),
        "values": np.asarray(ds.values),
        "q": q,
        "lps": lps,
        "targets": targets,
        "root": root,
    }


def _eval(s, ds, knn, mixed, cache=None, **kw):
    """``mixed``: p_knn's (weight, temperature)."""
    return evaluate(
        s["lm"],
        s["corpus"],
        "valid",
        context_len=CTX,
        batch_size=4,
        datastore=ds,
        knn=knn,
        knn_weight=mixed[0],
        knn_temperature=mixed[1],
        cache=cache,
        progress=False,
        **kw,
    )


def test_flat_index_equals_no_index_and_brute_force(setup):
    s = setup
    k, w, temp = 16, 0.3, 2.0
    d, i = brute_force_knn(s["q"], s["keys"], k)
    ref = knnlm_ppl(d, i, s["values"], s["lps"], s["targets"], w, temp)
    knn = KnnSettings(k=k)
    no_index = _eval(s, s["plain"], knn, (w, temp))
    flat = _eval(s, s["flat"], knn, (w, temp))
    assert no_index["settings"]["index"] != flat["settings"]["index"]
    assert no_index["knnlm"]["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert flat["knnlm"]["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert flat["knnlm"]["perplexity"] == pytest.approx(no_index["knnlm"]["perplexity"], rel=1e-6)


def test_search_exact_equals_no_index_whatever_index_exists(setup):
    """--search exact gives the exact kNN-LM even beside an IVF-PQ (approximate) index."""
    s = setup
    k, w, temp = 16, 0.3, 2.0
    d, i = brute_force_knn(s["q"], s["keys"], k)
    ref = knnlm_ppl(d, i, s["values"], s["lps"], s["targets"], w, temp)
    no_index = _eval(s, s["plain"], KnnSettings(k=k), (w, temp))
    for ds in (s["ivf"], s["flat"]):
        res = _eval(s, ds, KnnSettings(k=k, search="exact"), (w, temp))
        assert res["settings"]["search"]["search"] == "exact"
        assert res["knnlm"]["perplexity"] == pytest.approx(ref, rel=1e-5)
        assert res["knnlm"]["perplexity"] == no_index["knnlm"]["perplexity"]
    ivf = _eval(s, s["ivf"], KnnSettings(k=k), (w, temp))
    assert ivf["settings"]["search"]["exact_neighbours"] is False  # auto: the IVF-PQ index


def _faiss_search(s, nprobe, k):
    index = faiss.read_index(str(s["ivf"] / "index.faiss"))
    faiss.extract_index_ivf(index).nprobe = nprobe
    d, i = index.search(np.ascontiguousarray(s["q"], dtype=np.float32), k)
    return d, i


def test_ivfpq_reranked_is_exact_on_its_ids_and_pq_mode_uses_pq_distances(setup):
    s = setup
    k, w, temp = 16, 0.3, 2.0
    n = len(s["targets"])
    exact_d, exact_i = brute_force_knn(s["q"], s["keys"], k)
    exact = knnlm_ppl(exact_d, exact_i, s["values"], s["lps"], s["targets"], w, temp)

    # Re-ranked (default): the cached distances are the exact distances of the retrieved ids.
    knn = KnnSettings(k=k, nprobe=4)
    rr = _eval(s, s["ivf"], knn, (w, temp), cache=s["root"] / "c_rr")
    c = load_cache(s["root"] / "c_rr")
    ids = np.asarray(c["ids"])
    assert ids.shape == (n, k) and (ids >= 0).all()
    true_d = ((s["keys"][ids] - s["q"][:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(c["dists"]), true_d, rtol=1e-4, atol=1e-4)
    assert (np.diff(np.asarray(c["dists"]), axis=1) >= 0).all()
    ref_rr = knnlm_ppl(true_d, ids, s["values"], s["lps"], s["targets"], w, temp)
    assert rr["knnlm"]["perplexity"] == pytest.approx(ref_rr, rel=1e-5)
    assert rr["knnlm"]["perplexity"] == pytest.approx(exact, rel=0.05)
    # IVF-PQ finds most of the exact neighbours (recall@k).
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_i, strict=True)])
    assert recall > 0.5

    # recompute=False: FAISS's own PQ distances and ids, at the requested nprobe.
    pq = _eval(s, s["ivf"], KnnSettings(k=k, nprobe=4, recompute=False), (w, temp),
               cache=s["root"] / "c_pq")  # fmt: skip
    c = load_cache(s["root"] / "c_pq")
    fd, fi = _faiss_search(s, 4, k)
    np.testing.assert_array_equal(np.asarray(c["ids"]), fi)
    np.testing.assert_allclose(np.asarray(c["dists"]), fd, rtol=1e-5, atol=1e-5)
    ref_pq = knnlm_ppl(fd, fi, s["values"], s["lps"], s["targets"], w, temp)
    assert pq["knnlm"]["perplexity"] == pytest.approx(ref_pq, rel=1e-5)
    assert abs(fd - true_d).max() > 1e-2  # PQ distances are not the exact ones
    assert pq["knnlm"]["perplexity"] != pytest.approx(rr["knnlm"]["perplexity"], rel=1e-4)


def test_nprobe_reaches_the_search(setup):
    s = setup
    k, w, temp = 8, 0.5, 1.0
    ppl = {}
    for nprobe in (1, NLIST):
        knn = KnnSettings(k=k, nprobe=nprobe, recompute=False)
        res = _eval(s, s["ivf"], knn, (w, temp))
        fd, fi = _faiss_search(s, nprobe, k)
        ref = knnlm_ppl(fd, fi, s["values"], s["lps"], s["targets"], w, temp)
        assert res["knnlm"]["perplexity"] == pytest.approx(ref, rel=1e-5), nprobe
        ppl[nprobe] = ref
    assert ppl[1] != pytest.approx(ppl[NLIST], rel=1e-4)  # nprobe changes the result


def test_ivfpq_recall_at_k_with_fewer_probes_than_lists(setup):
    """The FAISS backend's recall@k against numpy brute force at nprobe < nlist, distances exact.

    The keys of a random tiny LM are not clustered and 4 x 6-bit PQ codes are coarse, so
    recall@10 saturates near 0.66 (measured) whatever nprobe; 4 of 16 lists must get there."""
    from knnlm.retrieval.search.faiss_backend import FaissBackend

    s = setup
    k = 10
    q = s["q"][::3]
    exact_d, exact_i = brute_force_knn(q, s["keys"], k)
    recall = {}
    for nprobe in (1, 4, NLIST):
        searcher = FaissBackend(s["ivf"], nprobe=nprobe, use_gpu=False)
        nb = searcher.search(torch.from_numpy(q.astype(np.float32)), k)
        d, i = nb.distances.numpy(), nb.rows.numpy()
        true_d = ((s["keys"][i] - q[:, None, :]) ** 2).sum(-1)
        np.testing.assert_allclose(d, true_d, rtol=1e-4, atol=1e-4)
        hits = [len(set(a) & set(b)) / k for a, b in zip(i, exact_i, strict=True)]
        recall[nprobe] = float(np.mean(hits))
    assert recall[4] >= 0.55, recall
    assert recall[1] <= recall[4] and recall[4] >= recall[NLIST] - 0.02, recall


def test_overlapped_pass_equals_brute_force_and_the_sequential_pass(setup):
    """The forward of batch i+1 running beside the search of batch i changes no number."""
    s = setup
    k, w, temp = 16, 0.3, 2.0
    d, i = brute_force_knn(s["q"], s["keys"], k)
    ref = knnlm_ppl(d, i, s["values"], s["lps"], s["targets"], w, temp)
    knn = KnnSettings(k=k)
    runs = {}
    for overlap in (False, True):
        cache = s["root"] / f"c_overlap_{overlap}"
        runs[overlap] = _eval(s, s["flat"], knn, (w, temp), cache=cache, overlap=overlap)
    assert runs[True]["knnlm"]["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert runs[True]["knnlm"]["nll_sum"] == runs[False]["knnlm"]["nll_sum"]
    a, b = load_cache(s["root"] / "c_overlap_True"), load_cache(s["root"] / "c_overlap_False")
    for name in ("ids", "dists", "values", "targets", "lm_log_prob"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
