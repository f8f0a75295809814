"""Section 5: the MLP memory trained on the datastore, its control, its settings and its reproduction stage."""
