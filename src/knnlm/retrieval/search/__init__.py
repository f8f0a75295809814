"""Neighbour search over a datastore's keys: one interface, its backends, and the FAISS index.

- :mod:`.protocol`: the interface every backend answers (``search(queries, k, exclude_rows) ->
  Neighbours``) and the ``--search`` names;
- :mod:`.choose`: :func:`~knnlm.retrieval.search.choose.open_backend`, which opens the backend a
  name (or ``auto``) asks for;
- exact search: :mod:`.exact` (torch, keys resident or streamed), :mod:`.sharded` (over the
  ranks of a torch.distributed job);
- the FAISS index: :mod:`.faiss_lib` (the FAISS import and GPU helpers), :mod:`.index_build`
  (building, resumable), :mod:`.index_factory` (any factory string), :mod:`.pca`,
  :mod:`.index_recall` (recall against exact search), :mod:`.saved_index` (loading and
  checking a saved index), :mod:`.rerank` (exact re-ranking), :mod:`.faiss_backend` (the index
  behind the interface);
- :mod:`.conventions`: the distance convention, argument checks and the keys' file, shared by
  all of the above.
"""
