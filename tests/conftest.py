import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor compiles in a pool of one process per core unless told otherwise; a worker of this suite has one core to
# itself, so the pool only adds processes that import torch and fight for that core (one test compiling the Qwen2-VL
# programs: 135 s with the pool, 106 s without, 2-core EPYC). Read when torch._inductor.config is imported, so set
# here, before anything imports torch; the CLI subprocesses the tests start inherit it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# Inductor's on-disk cache is keyed without the CPU's vector ISA, so a cache left in /tmp by another machine (or
# by a process that probed a different ISA) can hand this run kernels that do not build here. Unless the caller
# chose a cache (TORCHINDUCTOR_CACHE_DIR), the run gets a fresh one of its own, shared with the CLI subprocesses
# it starts and removed at the end.
_PRIVATE_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _PRIVATE_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="vtcompile-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _PRIVATE_INDUCTOR_CACHE


def pytest_configure(config):
    # pytest-xdist runs the suite in worker processes (pyproject: -n auto): each gets an equal share of the cores
    # for torch's own threads instead of every worker starting one thread per core.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        # the same share for what a worker starts: ONNX Runtime's sessions (their own pool, one spinning thread per
        # core by default) and the processes of the tests (the CLI, README blocks, new-process loads)
        os.environ.setdefault("VTCOMPILE_ORT_THREADS", str(share))
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


# The fast tier (`pytest -m "not slow"`, the inner loop) leaves out what lowers to a compiled target (Inductor and
# ONNX lowering, their artifacts, TensorRT's graph transform), starts the CLI in a subprocess, trains or evaluates
# the testbed, or compares the per-rewrite build's slow path; each costs 10-150 s on two cores. It also runs the
# geometry-parametrised oracle tests on the MHA geometry only (their tiny-gqa cases are slow; of the Qwen2-VL tests it
# runs the tiny-qwen2-vl cases, not the tiny-qwen2.5-vl ones) and leaves out the
# artifact round trips through torch.export, and the README blocks marked <!-- readme-test: slow -->. The default
# suite runs everything.
SLOW_WORDS = ("inductor", "onnx", "tensorrt_graph_transform", "tiny-gqa", "readme-slow", "tiny-qwen2.5-vl")
SLOW_TESTS = {
    "test_optimize_prints_report_and_writes_artifact", "test_bad_input_from_the_shell",  # subprocess smoke tests
    "test_existing_output_dir_is_refused_and_force_replaces_only_an_artifact",
    "test_cli_run_with_processor", "test_loads_in_a_new_process_without_the_model",
    "test_dyvte_routers_artifact_round_trip", "test_target_artifact_round_trip",
    "test_threshold_field_reaches_the_routers",
    "test_bench_chooses_router_setting_on_val_within_one_point", "test_bench_oracle_row",
    "test_trainer_smoke_writes_a_loadable_checkpoint", "test_compiled_training_step_matches_eager",
    "test_accuracy_on_fixed_test_slice", "test_random_pruning_hurts_fastv_much_less",
    "test_checkpoint_generate_ends_every_answer_with_eos", "test_testbed_greedy_equals_transformers_generate",
    "test_series_of_rewrites_builds_the_per_rewrite_graph", "test_eval_json_schema",
    "test_inspect_verifies_checksums_and_shows_every_field", "test_save_load_round_trip",
    "test_in_memory_transformers_model_is_accepted", "test_save_refuses_existing_dir_and_force_replaces_only_artifacts",
    "test_layout_and_manifest", "test_load_refuses_bad_manifests", "test_recipe_file_round_trip",
    "test_head_passes_after_dyvte_routers_rewrite_every_exit_branch",  # trains routers, compiles a program per exit
    "test_careless_flags_from_the_shell", "test_closed_pipe_and_ctrl_c_exit_quietly",  # subprocesses of the CLI
    "test_killed_write_leaves_nothing_the_next_one_does_not_clean",
    "test_calibrate_writes_recipe_and_routers_with_the_umask",  # trains routers
    "test_run_keeps_messages_off_the_answer_and_warns_about_unknown_words",  # compiles the testbed
    "test_cli_optimize_builds_the_programs_of_the_image_sizes_asked_for",  # Qwen2-VL: an artifact of three programs
    # vtcompile serve: compile the testbed, start servers (threads, a subprocess, Ray in a network namespace)
    "test_engine_concurrent_requests_equal_each_alone",
    "test_server_openai_client_concurrent_equals_alone_and_bad_requests",
    "test_full_queue_gets_429_and_a_client_that_leaves_frees_its_place",
    "test_serve_command_answers_and_stops_cleanly", "test_ray_replicas_share_requests_and_answer_as_one_process",
    # the fuzzer's drawn programs (compiles, calibrations, an artifact round trip per example)
    "test_fuzz_program_equals_masked_key_reference_and_keeps_its_schedule",
    "test_fuzz_artifact_round_trip_generates_the_same_tokens",
}


# Modules longest first: pyproject hands out whole test files (--dist loadfile, --no-loadscope-reorder), so a file's
# shared compiled models and fixtures are built once, on one worker; starting the files that take minutes first keeps
# both workers busy to the end instead of one finishing a long file alone. Seconds per file measured on a 2-core Xeon
# (2026-12-06, cold cache, two workers); a scheduling hint only: a stale number costs packing, never a result.
FILE_SECONDS = {
    "test_targets.py": 260, "test_readme.py": 160, "test_artifacts.py": 130, "test_accuracy_floors.py": 100,
    "test_headskip.py": 75, "test_cli.py": 70, "test_graph_passes.py": 65, "test_testbed_data.py": 60,
    "test_dyvte.py": 55, "test_generate.py": 50, "test_serve_ray.py": 45, "test_fitprune.py": 40,
    "test_pyramiddrop.py": 35, "test_backbones.py": 30, "test_api.py": 30, "test_eval.py": 25,
    "test_rewrite_primitives.py": 25, "test_serve.py": 20, "test_recipes.py": 17,
    "test_fuzz.py": 40, "test_qwen2_vl.py": 270,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's tests keep their order
    slow = pytest.mark.slow
    for item in items:
        name = item.name.split("[")[0]
        if name in SLOW_TESTS or any(w in item.name for w in SLOW_WORDS):
            item.add_marker(slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # A run that collected nothing must fail loudly, not pass as "no tests" (pytest's exit 5).
    if session.testscollected == 0:
        session.exitstatus = 1


def pytest_unconfigure(config):
    if _PRIVATE_INDUCTOR_CACHE is not None:
        shutil.rmtree(_PRIVATE_INDUCTOR_CACHE, ignore_errors=True)
