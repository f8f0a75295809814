"""Section 4: Macondo, the synthetic two-hop task: settings, run (one seed's named steps), tuning, aggregation, stage."""
