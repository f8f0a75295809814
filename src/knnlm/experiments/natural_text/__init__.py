"""Sections 2 and 5's natural-text runs: the corpus, the LMs, their datastores and the kNN-LM (its reproduction stages)."""
