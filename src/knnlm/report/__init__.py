"""Tables and figures for results and the reproduction report."""
