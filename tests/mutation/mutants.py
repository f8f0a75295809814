"""Named, targeted mutants of the code behind every reported number, and the tests that must
catch each one.

An edit is ``(anchor, exact source text, replacement)``. The anchor names where the text lives,
not which file: a function or class by its qualified name (``own_rows``, ``FaissBackend.search``,
``run_projection.solve_pending`` for a nested function) or a module-level constant
(``MEMORY_STORAGE_MAX``), looked up in every module of src/knnlm, so a mutant follows its code
when the code moves to another module. The anchor must be defined exactly once (where two
modules define the same name, write ``module.path:name``, e.g. ``retrieval.search.faiss_backend:FaissBackend.search``)
and the text must occur exactly once inside the anchor's source; otherwise the driver reports an
error: re-anchor the mutant. The tests are
pytest node ids, run from the repository root; each compares with an independent reference
(numpy brute force, HF hidden states, a hand-computed value), not a smoke check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


def mutant(name: str, why: str, anchor: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(name, why, ((anchor, old, new),), tests)


ENGINE = "tests/test_knnlm_vs_brute_force.py"
BRUTE = f"{ENGINE}::test_knnlm_perplexity_matches_brute_force"
REFIDX = "tests/test_reference_index.py"
GEN = "tests/test_generation.py"
CLAIMS = "tests/test_claims.py"
FAST = "tests/test_prune_pca.py"
GATE = "tests/test_gate.py"

MUTANTS: list[Mutant] = [
    mutant(
        "self_exclusion_off",
        "targets keep their own datastore row when evaluating the datastore's stream",
        "_add_knn",
        "own = own_rows(batch.positions) if exclude else None",
        "own = None",
        f"{ENGINE}::test_exclude_self_on_training_split",
    ),
    mutant(
        "self_exclusion_wrong_row",
        "each target drops the row of the next position (p) instead of its own (p - 1)",
        "own_rows",
        "return np.asarray(positions, dtype=np.int64) - 1",
        "return np.asarray(positions, dtype=np.int64)",
        f"{ENGINE}::test_exclude_self_on_training_split",
    ),
    mutant(
        "interpolation_weight_wrong_side",
        "knn_weight multiplies p_lm instead of p_knn",
        "interpolate",
        "torch.logaddexp(lm_log_prob + math.log1p(-weight), other_log_prob + math.log(weight))",
        "torch.logaddexp(lm_log_prob + math.log(weight), other_log_prob + math.log1p(-weight))",
        BRUTE,
    ),
    mutant(
        "temperature_ignored",
        "neighbour weights softmax(-d) whatever the temperature",
        "_neighbour_logits",
        "logits = -dists.float() / temperature",
        "logits = -dists.float()",
        BRUTE,
    ),
    mutant(
        "missing_ids_not_masked",
        "-1 neighbour ids (fewer than k found) get weight",
        "_neighbour_logits",
        "valid = (ids >= 0) & torch.isfinite(logits)",
        "valid = torch.isfinite(logits)",
        f"{ENGINE}::test_p_knn_sums_to_one_and_masks_missing",
    ),
    mutant(
        "fast_pruned_counts_ignored",
        "a pruned datastore's merged rows weigh 1 in p_knn instead of their counts",
        "_neighbour_logits",
        "logits = logits + counts.float().clamp_min(1.0).log()",
        "logits = logits",
        f"{FAST}::test_known_duplicates_merge_to_counts_and_weighted_p_knn",
        f"{FAST}::test_evaluating_a_pruned_store_uses_its_counts",
    ),
    mutant(
        "fast_p_knn_underflow_kept",
        "a target weight that underflows float32 next to the nearest neighbour is not redone",
        "knn_target_log_prob",
        "if tiny.numel():",
        "if False:",
        f"{ENGINE}::test_p_knn_target_far_below_the_nearest_stays_exact",
    ),
    mutant(
        "fast_merge_last_kept_row_wins",
        "a merged row's count goes to the last kept row that lists it, not the first",
        "greedy_merge",
        "np.minimum.at(absorber, dst[fwd][by_alive], src[fwd][by_alive])",
        "absorber[dst[fwd][by_alive]] = src[fwd][by_alive]",
        f"{FAST}::test_greedy_merge_equals_the_sequential_visit",
    ),
    mutant(
        "fast_merge_visited_rows_never_absorbed",
        "a visited row that absorbed nothing stays (the first pass's rule), not He et al.'s",
        "greedy_merge",
        "late = _absorbed_after_visit(n, src[back], dst[back])",
        "late = np.full(n, n, np.int64)",
        f"{FAST}::test_greedy_merge_equals_the_sequential_visit",
    ),
    mutant(
        "fast_gate_searches_every_token",
        "the gate's skipped tokens are searched and mixed anyway",
        "_add_gated_knn",
        "rows = torch.nonzero(keep).squeeze(1)",
        "rows = torch.arange(len(keep))",
        f"{GATE}::test_per_token_skipped_equal_lm_and_kept_equal_knnlm",
    ),
    mutant(
        "fast_gate_threshold_inverted",
        "the gate searches the tokens it scores lowest",
        "Gate.decide",
        "return scores > self.threshold(rate), wanted",
        "return scores < self.threshold(1.0 - rate), wanted",
        f"{GATE}::test_entropy_gate_retrieves_the_unsure_tokens",
    ),
    mutant(
        "window_layout_off_by_one",
        "the next window starts one token late, so one target per window is never scored",
        "make_windows",
        "begin = min(begin + stride, scored_until - 1)",
        "begin = min(begin + stride, scored_until)",
        "tests/test_adapters_and_perplexity.py::test_every_target_scored_once_with_most_context",
        "tests/test_adapters_and_perplexity.py::test_perplexity_equals_token_by_token",
    ),
    mutant(
        "window_scoring_off_by_one",
        "each window scores from one logit column too late (its first target is skipped)",
        "_stream",
        "first = torch.tensor([w.score_from - w.begin - 1 for w in group])",
        "first = torch.tensor([w.score_from - w.begin for w in group])",
        "tests/test_adapters_and_perplexity.py::test_perplexity_equals_token_by_token",
    ),
    mutant(
        "key_from_wrong_layer",
        "keys (and Eq. 1's split) taken from the second-to-last block",
        "Adapter.last_block",
        "return _get(self.base, self.family.blocks)[-1]",
        "return _get(self.base, self.family.blocks)[-2]",
        "tests/test_reference_models.py::test_datastore_keys_equal_hf_hidden_states",
        BRUTE,
    ),
    Mutant(
        "reranking_off",
        "IVF-PQ distances are never replaced by exact ones (fused and memmap paths)",
        (
            (
                "FaissBackend.__init__",
                "self.refined = self._make_refined(keys_in_ram) if recompute else None",
                "self.refined = None",
            ),
            (
                "FaissBackend.nearest",
                "        if self.recompute:\n",
                "        if False:\n",
            ),
        ),  # fmt: skip
        (
            f"{REFIDX}::test_ivfpq_reranked_is_exact_on_its_ids_and_pq_mode_uses_pq_distances",
            f"{REFIDX}::test_ivfpq_recall_at_k_with_fewer_probes_than_lists",
        ),
    ),
    mutant(
        "generation_passthrough",
        "the kNN logits processor returns the LM's scores unchanged",
        "KnnLogitsProcessor.__call__",
        "return interpolate(lm_lp, knn_lp.to(scores.device), self.mix.knn_weight).to(scores.dtype)",
        "return scores",
        f"{GEN}::test_processor_scores_equal_hand_built_interpolation",
        f"{GEN}::test_cli_generate_equals_greedy_reference",
    ),
    mutant(
        "dimension_check_removed",
        "a datastore whose keys have another size is accepted",
        "Datastore.check_compatible",
        'if m["dim"] != lm.adapter.hidden_size:',
        "if False:",
        f"{ENGINE}::test_datastore_from_other_model_is_refused",
    ),
    mutant(
        "tokenizer_check_removed",
        "a datastore built with another tokenizer is accepted",
        "Datastore.check_compatible",
        'if m["tokenizer_fingerprint"] != lm.tokenizer_fingerprint:',
        "if False:",
        f"{ENGINE}::test_datastore_from_other_model_is_refused",
    ),
    mutant(
        "model_check_removed",
        "a datastore built with another model is accepted",
        "Datastore.check_compatible",
        'if m["model_fingerprint"] != lm.fingerprint:',
        "if False:",
        f"{ENGINE}::test_datastore_from_other_model_is_refused",
    ),
    Mutant(
        "perplexity_per_batch",
        "perplexity = exp(mean over batches of the batch-mean NLL), not per token",
        (
            (
                "_sum_nll",
                'nll["lm"] -= float(lm_lp.double().sum())',
                'nll["lm"] -= float(lm_lp.double().mean()); nll["batches"] = nll.get("batches", 0) + 1',
            ),
            (
                "_result",
                '"lm": {"perplexity": perplexity(nll["lm"], n_tokens)',
                '"lm": {"perplexity": perplexity(nll["lm"], nll["batches"])',
            ),
        ),  # fmt: skip
        ("tests/test_adapters_and_perplexity.py::test_perplexity_equals_token_by_token",),
    ),
    mutant(
        "datastore_resume_skips_a_batch",
        "a resumed build starts one batch after the last recorded one",
        "_write_rows",
        '["batches_done"]))',
        '["batches_done"]) + 1)',
        f"{ENGINE}::test_datastore_resume_is_byte_identical",
    ),
    mutant(
        "mlp_memory_layernorm_dropped",
        "the MLP memory computes W (z + MLP(z)) without its LayerNorm",
        "MemoryMLP.features",
        "return z + self.ln(self.mlp(z))",
        "return z + self.mlp(z)",
        "tests/test_mlp_memory.py::test_forward_matches_manual_computation",
        "tests/test_reference_memory.py::test_lm_plus_memory_perplexity_equals_numpy_forward",
    ),
    mutant(
        "projection_init_wrong_point",
        "the projection onto f starts at enc(c) instead of g(enc(c))",
        "run_projection.solve_pending",
        '("proj_f", adapter.f_logits, g_enc),',
        '("proj_f", adapter.f_logits, enc),',
        "tests/test_reference_projection.py",
    ),
    mutant(
        "nprobe_not_passed",
        "--nprobe never reaches the searcher (the index's stored default is used)",
        "Retriever.__init__",
        "nprobe=knn.nprobe,",
        "nprobe=None,",
        f"{REFIDX}::test_nprobe_reaches_the_search",
    ),
    mutant(
        "no_recompute_ignored",
        "--no-recompute still re-ranks exactly (PQ distances never used)",
        "Retriever.__init__",
        "recompute=knn.recompute",
        "recompute=True",
        f"{REFIDX}::test_ivfpq_reranked_is_exact_on_its_ids_and_pq_mode_uses_pq_distances",
    ),
    mutant(
        "block_input_key_is_ffn_input",
        "block_input datastores store the normed MLP input instead of the residual stream",
        "Adapter.key_from",
        'return store["enc" if key_type == "block_input" else key_type]',
        'return store["ffn_input" if key_type == "block_input" else key_type]',
        "tests/test_reference_models.py::test_datastore_keys_equal_hf_hidden_states",
    ),
    mutant(
        "bf16_logits_not_upcast",
        "bf16 logits go through log-softmax in bf16 instead of float32",
        "_score_batch",
        "sel = out.logits[mask].float()",
        "sel = out.logits[mask]",
        "tests/test_reference_models.py::"
        "test_bf16_logits_branch_equals_float32_log_softmax_of_each_window",
    ),
    mutant(
        "sweep_ignores_k",
        "the sweep scores all cached neighbours whatever k",
        "prefix_log_probs",
        "dists[:, :k], ids[:, :k], values[:, :k], targets, float(t), c",
        "dists, ids, values, targets, float(t), c",
        f"{ENGINE}::test_sweep_from_cache_equals_direct_eval",
    ),
    mutant(
        "memory_weight_wrong_side",
        "memory_weight multiplies p_lm instead of the MLP memory's distribution",
        "_add_memory",
        "combine(lm_lp, mem_lp, memory_weight)",
        "combine(mem_lp, lm_lp, memory_weight)",
        "tests/test_reference_memory.py::test_lm_plus_memory_perplexity_equals_numpy_forward",
    ),
    mutant(
        "converged_solve_forgets_best",
        "the converged solve returns its last trial z instead of the best one seen",
        "_lbfgs_closure.closure",
        'better = kl.detach() < best["kl"]  # NaN never replaces a finite best',
        'better = torch.ones_like(best["kl"], dtype=torch.bool)',
        "tests/test_projection_solver.py::test_converged_solve_is_at_most_the_fixed_step_solves",
    ),
    mutant(
        "macondo_verdict_read_on_dev_too",
        "Section 4's groups read on every parent, the dev parents that chose the settings too",
        "_verdict_groups",
        "ns_kept = [n for n, k in zip(ns, keep, strict=True) if k]",
        "keep = np.ones(len(ns), dtype=bool)\n    ns_kept = list(ns)",
        "tests/test_macondo.py::test_tuning_on_a_dev_share_of_the_parents",
    ),
    # Claim verdicts (src/knnlm/report/<analysis>.py): each criterion loosened or tightened.
    mutant(
        "claim_a_any_seed",
        "(a) held when the kNN-LM wins in one seed instead of every seed",
        "claim_knnlm",
        "HELD if wins == len(per) else NOT_HELD, CRITERION_A",
        "HELD if wins >= 1 else NOT_HELD, CRITERION_A",
        f"{CLAIMS}::test_a_fails_when_one_seed_loses",
    ),
    mutant(
        "claim_b_premise_dropped",
        "(b) judged even when the kNN-LM has no gain over the LM to explain",
        "_premise",
        "if not knn < lm * (1 - PROJECTION_MIN_GAIN):",
        "if False:",
        f"{CLAIMS}::test_b_premise_no_knn_gain_is_untestable",
    ),
    mutant(
        "claim_b_reads_the_papers_rule",
        "(b) read on the paper's early-stopped solve instead of the converged one",
        "claim_projection",
        "status, text = _converged_part(p, conv[key], name)",
        "status, text = _converged_part(p, p[key], name)",
        f"{CLAIMS}::test_b_is_read_on_the_converged_solve_not_the_papers_rule",
    ),
    mutant(
        "claim_table4_no_spread",
        "Table 4 held when f∘g is worse on average, however wide the spread over positions",
        "claim_table4",
        "judge(iv, TABLE4_MIN_EFFECT), CRITERION_T4",
        '"held" if iv.mean > 0 else "not held", CRITERION_T4',
        f"{CLAIMS}::test_table4_fails_within_the_spread",
    ),
    mutant(
        "inconclusive_read_as_not_held",
        "the inconclusive rule dropped: an interval that cannot decide reads as not held",
        "judge",
        "    return INCONCLUSIVE",
        "    return NOT_HELD",
        f"{CLAIMS}::test_c_gain_within_seed_spread_is_inconclusive",
    ),
    mutant(
        "not_held_on_the_mean",
        "not held whenever the mean is below the minimum effect, though the interval reaches it",
        "judge",
        "if iv.upper < min_effect:",
        "if iv.mean < min_effect:",
        f"{CLAIMS}::test_e_one_seed_behind_is_inconclusive_all_behind_not_held",
    ),
    mutant(
        "claim_c_premise_dropped",
        "Section 4's headline judged even when the LM never fitted its training facts",
        "_fit_failure",
        'if not p["train"]["lm"][n] >= -math.log(int(n)) - FIT_MARGIN_NATS',
        "if False",
        f"{CLAIMS}::test_headline_premise_unfitted_lm_is_untestable",
    ),
    mutant(
        "section4_headline_any_shortfall",
        "Section 4's headline held for any shortfall below log(1/n), not 'much lower'",
        "claim_headline",
        "status = judge(iv, HEADLINE_MIN_GAP)",
        "status = judge(iv, 0.0)",
        f"{CLAIMS}::test_headline_not_held_when_the_lm_already_generalises",
    ),
    mutant(
        "claim_d_papers_criterion_needs_the_control",
        "(d) made to need the equal-compute control, a check the paper's sentence does not make",
        "claim_memory",
        "        status = decided\n",
        '        status = decided if claim_memory_control(r)["status"] == "held" else "not held"\n',
        f"{CLAIMS}::test_d_is_the_papers_sentence_not_the_control",
    ),
    mutant(
        "claim_d_storage_ignored",
        "(d) held however large the MLP's storage",
        "claim_memory",
        "if not counted < MEMORY_STORAGE_MAX:",
        "if False:",
        f"{CLAIMS}::test_d_storage_bound_is_4_percent_of_what_the_mlp_adds",
    ),
    mutant(
        "claim_d_storage_25_percent",
        "(d) accepts an MLP of 25% of the kNN storage (the paper: under 4%)",
        "MEMORY_STORAGE_MAX",
        "MEMORY_STORAGE_MAX = 0.04",
        "MEMORY_STORAGE_MAX = 0.25",
        f"{CLAIMS}::test_d_storage_bound_is_4_percent_of_what_the_mlp_adds",
    ),
    mutant(
        "claim_e_step_zero_counted",
        "(e) the shared initialisation (step 0) counts towards the early gap",
        "first_half_gap",
        "idx = (x > 0) & (x <= FIRST_PART * x.max())",
        "idx = (x >= 0) & (x <= FIRST_PART * x.max())",
        f"{CLAIMS}::test_e_step_zero_and_second_half_do_not_count",
    ),
    mutant(
        "claim_e_any_seed",
        "(e) held when the model without the last MLP is ahead in one seed only",
        "_hurdle_part",
        "return judge(iv, HURDLE_MIN_GAP), text",
        "return (HELD if ahead >= 1 else NOT_HELD), text",
        f"{CLAIMS}::test_e_one_seed_behind_is_inconclusive_all_behind_not_held",
    ),
    mutant(
        "projection_warm_start_dropped",
        "the converged f solve starts only from g(enc(c)) and can end above f∘g",
        "_converged_solves",
        'out["proj_f"] = (adapter.f_logits, keep_better(out["proj_f"][1], warm))',
        "pass",
        "tests/test_projection.py::test_converged_f_never_ends_above_f_of_g",
    ),
    mutant(
        "projection_warm_start_keeps_the_worse",
        "the warm start keeps the solve with the higher KL",
        "keep_better",
        "better = warm.kl < cold.kl",
        "better = warm.kl > cold.kl",
        "tests/test_projection.py::test_keep_better_takes_the_lower_kl_per_position",
    ),
    mutant(
        "faiss_knn_ties_unordered",
        "faiss.knn's own order of equal distances at the k-th place is kept (not redone by row)",
        "FaissExactSearch.search",
        "        if tied.any():",
        "        if False:",
        "tests/test_search_choice.py::test_faiss_knn_equals_torch_exact_with_ties",
    ),
    mutant(
        "split_gemm_norm_low_part_dropped",
        "the one-GEMM GPU path keeps only the high 16-bit part of each key's squared norm",
        "fused_keys",
        "split16(norms[s : s + step] / scale, dtype, parts)",
        "split16(norms[s : s + step] / scale, dtype, parts)[:1]",
        "tests/test_torch_search.py::test_one_gemm_split_path_of_the_gpu_equals_float64",
    ),
    mutant(
        "pointers_search_at_threshold",
        "RetoMaton searches when exactly the threshold of pointers survive, not fewer",
        "pointer_neighbours",
        "((state >= 0).sum(1) < threshold)",
        "((state >= 0).sum(1) <= threshold)",
        "tests/test_pointers.py::test_pointers_equal_the_plain_loop",
    ),
    mutant(
        "pointers_follow_unmatched",
        "pointers follow every neighbour, not only those whose value was the actual token",
        "pointer_neighbours",
        "ok &= values[cur.clamp(0, n_rows - 1)] == targets[tok][:, None]",
        "ok &= values[cur.clamp(0, n_rows - 1)] >= 0",
        "tests/test_pointers.py::test_pointers_equal_the_plain_loop",
    ),
    mutant(
        "generation_pointers_follow_unmatched",
        "generation follows every neighbour of the last step, not those that matched its token",
        "KnnLogitsProcessor._neighbours",
        "(prev.values == last[:, None])",
        "(prev.values >= 0)",
        f"{GEN}::test_generation_with_pointers_equals_its_loop_reference",
    ),
    mutant(
        "lm_stats_entropy_sign",
        "the gate's entropy feature comes out negated",
        "lm_stats",
        "entropy = log_p.exp().mul_(log_p).sum(-1).neg_()",
        "entropy = log_p.exp().mul_(log_p).sum(-1)",
        "tests/test_combiner.py::test_lm_stats_equal_numpy_from_the_kept_logsumexp",
    ),
]
