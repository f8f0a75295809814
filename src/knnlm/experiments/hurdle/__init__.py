"""Appendix E: the hurdle (with vs without the last MLP): settings, run, stage."""
