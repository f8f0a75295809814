"""Section 3 at other model widths: run and stage."""
