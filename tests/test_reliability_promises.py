"""Every promise of docs/reliability.md (a paragraph starting with its name in bold) has tests that check it,
named here; a promise added to the page without a test, or a test renamed away, fails this file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# promise (its bold name on the page) -> "file::test" that check it
PROMISES: dict[str, list[str]] = {
    "One line, never a traceback or a hang": [
        "test_reliability.py::test_an_unexpected_error_in_the_loop_never_hangs",
        "test_bad_input.py::test_read_only_output_folder",
        "test_reliability_workers.py::test_shared_memory_exhausted_ends_the_run_in_one_line_keeping_rows",
    ],
    "A reader never sees a partial file": [
        "test_store.py::test_a_file_being_written_is_never_read",
        "test_reliability.py::test_kill_9_then_rerun_resumes_to_identical_features",
    ],
    "Interrupted, killed, crashed": [
        "test_reliability.py::test_kill_9_then_rerun_resumes_to_identical_features",
        "test_reliability.py::test_signal_during_extraction_exits_130_and_resumes",
        "test_reliability.py::test_ctrl_c_says_how_far_and_resumes",
        "test_store.py::test_crash_then_resume_gives_the_same_file",
    ],
    "One policy for a partial `.tmp`": [
        "test_reliability.py::test_force_discards_a_partial_file_and_nothing_else_does",
        "test_store.py::test_partial_file_with_other_settings_is_kept",
    ],
    "A full disk": [
        "test_reliability.py::test_full_disk_is_one_line_and_the_rerun_resumes",
        "test_store.py::test_no_room_for_a_commit_keeps_the_last_one",
        "test_store.py::test_a_file_size_limit_is_a_full_disk_and_the_rows_before_it_resume",
    ],
    "Refused up front, in one line": [
        "test_store.py::test_an_output_name_too_long_for_its_companions_is_refused_up_front",
        "test_reliability.py::test_a_split_whose_images_are_all_unreadable_is_refused",
        "test_reliability.py::test_split_seed_out_of_range_is_one_line",
        "test_reliability.py::test_an_image_over_the_pixel_cap_is_unreadable_before_decoding",
        "test_reliability.py::test_a_file_name_that_is_not_utf8_is_stored_escaped",
        "test_reliability.py::test_out_inside_the_image_folder_is_not_a_class",
    ],
    "Only regular files are images": [
        "test_reliability_stage1.py::test_fifo_and_device_link_are_skipped_not_opened",
        "test_reliability_stage1.py::test_load_image_refuses_a_fifo_before_opening",
    ],
    "A feature file reads nothing outside itself": [
        "test_hostile_files.py::test_a_file_that_reads_outside_itself_is_refused_on_open",
        "test_hostile_files.py::test_the_files_own_layer_views_stay_readable",
        "test_hostile_files.py::test_duplicate_class_names_are_refused_on_read",
        "test_hostile_files.py::test_a_class_without_training_rows_is_refused_naming_it",
    ],
    "Loader workers that fail": [
        "test_reliability_workers.py::test_shared_memory_exhausted_ends_the_run_in_one_line_keeping_rows",
        "test_reliability_workers.py::test_a_killed_worker_ends_the_run_in_one_line",
        "test_reliability_workers.py::test_too_little_shared_memory_up_front_sizes_down_in_one_line",
        "test_reliability_workers.py::test_a_1_mib_dev_shm_is_said_and_sized_down_or_ends_in_one_line",
        "test_reliability_workers.py::test_sigterm_with_a_worker_blocked_on_a_fifo_exits_within_5_s",
    ],
    "One listing and one pixel policy": [
        "test_reliability_units.py::test_predict_lists_a_folder_as_extract_does",
        "test_reliability_units.py::test_one_pixel_policy_for_every_reader",
    ],
    "Weights holding NaN": ["test_reliability_units.py::test_weights_holding_nan_stop_at_the_first_batch"],
    "A head folder is one unit": [
        "test_reliability_units.py::test_a_killed_train_head_force_leaves_the_old_head_folder",
        "test_reliability_units.py::test_a_head_folder_of_other_files_is_not_replaced",
    ],
    "An export is one unit": [
        "test_reliability_units.py::test_a_killed_export_never_loads_as_a_mix",
        "test_reliability_units.py::test_export_into_a_read_only_filesystem_is_one_line",
        "test_reliability_units.py::test_model_json_nested_200000_deep_is_one_line",
    ],
    "A damaged baseline checkpoint": [
        "test_reliability_units.py::test_a_tampered_baseline_checkpoint_with_its_key_kept_is_one_line",
    ],
    "Predictions CSVs": ["test_reliability_units.py::test_class_names_that_look_like_formulas_are_escaped_in_the_csv"],
    "A large targets CSV": ["test_reliability_units.py::test_a_large_targets_csv_is_streamed"],
    "Progress": [
        "test_progress.py::test_a_log_gets_a_line_per_tenth_at_most",
        "test_progress.py::test_a_terminal_gets_a_live_bar",
        "test_progress.py::test_a_resumed_run_counts_from_where_it_was_and_ends_with_a_line",
    ],
    "Concurrency": [
        "test_store.py::test_many_readers_at_once",
        "test_store.py::test_lock_refuses_a_second_writer_and_dies_with_its_process",
        "test_store.py::test_a_file_being_written_is_never_read",
        "test_reliability.py::test_an_up_to_date_file_is_reused_without_taking_the_lock",
    ],
}


def promises_on_the_page() -> list[str]:
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    return [m.group(1).rstrip(".") for m in re.finditer(r"^\*\*(.+?)\*\*", text, flags=re.MULTILINE)]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_promise_of_the_reliability_page_has_tests() -> None:
    """docs/reliability.md: "`tests/test_reliability_promises.py` names the tests that check each one"."""
    on_page = promises_on_the_page()
    assert len(on_page) == len(set(on_page)) and len(on_page) >= 10, on_page
    assert set(on_page) == set(PROMISES), set(on_page) ^ set(PROMISES)


def test_the_tests_named_for_each_promise_exist() -> None:
    missing = []
    for promise, tests in PROMISES.items():
        assert tests, promise
        for ref in tests:
            file, name = ref.split("::")
            if name not in _tests_in(ROOT / "tests" / file):
                missing.append(f"{promise}: {ref}")
    assert not missing, missing
