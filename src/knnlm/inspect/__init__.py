"""``knnlm inspect``: a local page (or a static one) showing what the kNN-LM retrieved.

- :mod:`knnlm.inspect.view`: the view model. One scoring pass and one search at ``k_max``
  per text (``token_scores.score_tokens``), then every view at other settings recomputed from
  those neighbours with ``retrieval/knn.py``'s functions: per-token log-probs and colours,
  running perplexities, a token's neighbours and its three distributions, generation steps;
- :mod:`knnlm.inspect.requests`: the requests' bounds and checks (one clear message each);
- :mod:`knnlm.inspect.server`: the Starlette app and its uvicorn server (loopback, bounded
  queue, 429 beyond it);
- :mod:`knnlm.inspect.static`: the same page for one text as one self-contained HTML file;
- ``assets/``: the page (plain HTML, CSS and JavaScript; the script only draws what the
  server computed).
"""
