"""Corpus sources, scoring windows, name lists and the Macondo generator."""
