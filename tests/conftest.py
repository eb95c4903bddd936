"""Shared pytest set-up: the ``slow`` and ``multirank`` markers, applied from one table.

The package and the helpers in tests/ are on sys.path through pyproject.toml's
``[tool.pytest.ini_options] pythonpath``. ``pytest -m "not slow"`` is the quick loop;
``tools/run_tests.sh`` (what CI runs) runs every test.
"""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALL = "*"
# {marker: {test file: test function names, or ALL}}. Parametrized tests match by function
# name. slow: loads the real SmolLM2-135M weights, or takes over about 20 s on 2 CPU cores.
# multirank: starts several processes (dist_utils.run_ranks with 2 ranks, a launcher, a harness).
# real 2-rank runs: slow and multirank both
_CHECKED_RUNS = ("test_two_ranks_end_to_end_under_the_checking_backend",
                 "test_the_old_trainer_fails_under_the_checking_backend")
_BF16_RUNS = ("test_bf16_run_builds_bf16_with_exact_masters_through_compaction",)
_PREEMPTION_RUNS = ("test_one_signalled_rank_stops_every_rank_and_the_run_resumes_exactly",
                    "test_preempted_inside_the_l0_soft_phase_resumes_exactly")
_CACHE_RUNS = ("test_a_second_run_reads_the_cache_and_trains_bit_identically",)
_SP_RUNS = ("test_sequence_parallel_equals_tp2_statistics_decisions_and_obs",
            "test_sequence_parallel_training_run_ends_with_the_same_architecture")

MARKS = {
    "slow": {
        "test_training.py": ALL,
        "test_training_pp.py": ALL,
        "test_training_tp.py": ALL,
        "test_reliability_bad_input.py": ("test_cli_cases",),
        "test_reliability_checkpoints.py": ALL,
        "test_reliability_kill_resume.py": ALL,
        "test_reliability_run_dir.py": (
            "test_checkpoint_stores_a_plain_fingerprint", "test_a_changed_run_is_refused_in_one_line",
            "test_safe_changes_resume_and_are_logged", "test_fresh_moves_the_earlier_run_aside",
            "test_training_starts_from_a_megatron_checkpoint",
        ),
        "test_eval_smollm2.py": ALL,
        "test_hf_io.py": ("test_real_smollm2_gguf_and_its_cached_hf_folder",),
        "test_gguf_export.py": ("test_real_smollm2_exports_to_gguf",),
        "test_megatron_convert.py": (
            "test_real_smollm2_conversion_logits_and_greedy_generation",
            "test_checkpoint_saved_at_tp2_loads_at_pp2_and_tp1",
        ),
        "test_engine_reshard.py": ALL,
        "test_cluster_knobs.py": (
            "test_fp32_gradient_accumulation_keeps_small_micro_batch_gradients",
            "test_nonfinite_gradient_of_an_earlier_micro_batch_is_detected",
            "test_recompute_gives_the_same_loss_gradients_and_statistics",
        ),
        "test_gpu_check.py": ALL,
        "test_te_layout.py": ALL,
        "test_reliability_untrusted.py": ALL,
        "test_reliability_runs.py": ALL,
        "test_host_syncs.py": ALL,
        "test_comm_device_check.py": _CHECKED_RUNS,
        "test_bf16_build.py": _BF16_RUNS,
        "test_preemption.py": _PREEMPTION_RUNS,
        "test_sequence_parallel.py": _SP_RUNS,
        "test_distill_training.py": ALL,
        "test_snapshots.py": ("test_each_fraction_is_written_once_and_loads_in_transformers",
                              "test_snapshot_computes_what_the_trainer_computed_at_its_step",
                              "test_resume_between_two_snapshots_writes_only_the_second"),
        "test_teacher_cache.py": _CACHE_RUNS,
    },
    "multirank": {
        "test_distill_kl.py": ("test_tensor_parallel_kl_equals_the_single_process_kl",),
        "test_data_dynamic.py": ("test_two_gloo_ranks_partition_the_global_batch",),
        "test_engine_reshard.py": ALL,
        "test_launch_env.py": ("test_two_srun_tasks_form_one_world",),
        "test_megatron_convert.py": ("test_checkpoint_saved_at_tp2_loads_at_pp2_and_tp1",),
        "test_megatron_model.py": ("test_tp2_and_pp2_logits_match_hf",),
        "test_pruning_distributed.py": (
            "test_data_parallel_scores_equal_one_process_and_ranks_must_agree",
            "test_tp2_and_pp2_match_tp1_scores_plan_weights_and_masked_equals_pruned",
        ),
        "test_reliability_checkpoints.py": ALL,
        "test_reliability_kill_resume.py": ALL,
        "test_reliability_untrusted.py": ("test_a_refusal_on_one_rank_stops_every_rank_and_every_zero_stage_loads",),
        "test_training.py": ALL,
        "test_training_pp.py": ALL,
        "test_training_tp.py": ALL,
        "test_host_syncs.py": ALL,
        "test_comm_device_check.py": ("test_an_unplaced_package_tensor_is_refused_as_nccl_would",
                                      "test_comm_places_what_it_sends_objects_included") + _CHECKED_RUNS,
        "test_bf16_build.py": _BF16_RUNS,
        "test_preemption.py": _PREEMPTION_RUNS,
        "test_sequence_parallel.py": ("test_sequence_parallel_block_cosines_survive_a_checkpoint_once",) + _SP_RUNS,
        "test_distill_training.py": ALL,
        "test_snapshots.py": ("test_each_fraction_is_written_once_and_loads_in_transformers",
                              "test_snapshot_computes_what_the_trainer_computed_at_its_step",
                              "test_resume_between_two_snapshots_writes_only_the_second"),
        "test_teacher_cache.py": ("test_tensor_parallel_topk_kl_and_cache_equal_tp1",) + _CACHE_RUNS,
    },
}


def pytest_collection_modifyitems(config, items):
    checked = set()
    for item in items:
        for marker, table in MARKS.items():
            names = table.get(item.path.name, ())
            if names == ALL or getattr(item, "originalname", item.name) in names:
                item.add_marker(getattr(pytest.mark, marker))
            # a renamed test must not silently lose its marker
            if names != ALL and (marker, item.path.name) not in checked:
                checked.add((marker, item.path.name))
                missing = [n for n in names if not hasattr(item.module, n)]
                if missing:
                    raise pytest.UsageError(f"tests/conftest.py MARKS[{marker!r}] names {missing}, "
                                            f"which {item.path.name} does not define")
