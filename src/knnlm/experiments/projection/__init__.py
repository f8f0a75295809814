"""Section 3: the projection of p_knnlm onto f's and f∘g's output spaces (Eq. 2): settings, run, solver, stage."""
