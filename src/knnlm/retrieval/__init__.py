"""Datastore, FAISS index and the pure kNN distribution math."""
