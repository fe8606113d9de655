import os
import sys
from pathlib import Path

import pytest
import torch

# Shared test helpers (tests/alignment_cases.py) are imported by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ---- process-wide state: every test leaves it as it found it --------------------------------
# A test that flips TF32, the default dtype or an environment variable changes what every later
# test in the same process computes, so its result depends on the test order. This fixture
# records that state before each test and fails the test that changed it (restoring it first,
# so one leak is reported once). Tests change such state through monkeypatch, which undoes it.


# Variables that are not a test's doing: pytest rewrites PYTEST_CURRENT_TEST at every phase, and
# torch sets TORCHINDUCTOR_CACHE_DIR once, the first time anything in the process compiles.
_NOT_A_TESTS_DOING = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _process_state() -> dict:
    return {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch.default_dtype": torch.get_default_dtype(),
        "torch.deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch.grad_enabled": torch.is_grad_enabled(),
        "torch.num_threads": torch.get_num_threads(),
        "os.environ": {k: v for k, v in os.environ.items() if k not in _NOT_A_TESTS_DOING},
    }


def _restore_process_state(state: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = state["torch.backends.cuda.matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = state["torch.backends.cudnn.allow_tf32"]
    torch.set_float32_matmul_precision(state["torch.float32_matmul_precision"])
    torch.set_default_dtype(state["torch.default_dtype"])
    torch.use_deterministic_algorithms(state["torch.deterministic_algorithms"])
    torch.set_grad_enabled(state["torch.grad_enabled"])
    torch.set_num_threads(state["torch.num_threads"])
    for key in set(os.environ) - set(state["os.environ"]) - _NOT_A_TESTS_DOING:
        del os.environ[key]
    os.environ.update(state["os.environ"])


def _describe_changes(before: dict, after: dict) -> list[str]:
    changes = []
    for name, was in before.items():
        now = after[name]
        if name == "os.environ":
            for key in sorted(set(was) | set(now)):
                if was.get(key) != now.get(key):
                    changes.append(f"os.environ[{key!r}]: {was.get(key)!r} -> {now.get(key)!r}")
        elif was != now:
            changes.append(f"{name}: {was!r} -> {now!r}")
    return changes


@pytest.fixture(autouse=True)
def _process_state_is_restored():
    before = _process_state()
    yield
    changes = _describe_changes(before, _process_state())
    if changes:
        _restore_process_state(before)
        pytest.fail("the test changed process-wide state without restoring it: " + "; ".join(changes))


# ---- CUDA tests: a visible GPU must run them -------------------------------------------------
# One rule for every CUDA test (marked `cuda`): it skips only where no GPU is visible, and fails
# where one is visible but the CUDA kernels were not compiled. And where a GPU is visible and
# every CUDA test skipped all the same (a wrong skip condition), the session fails rather than
# reporting a green run that checked no kernel.


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    import crystal_ext

    if not crystal_ext.build_info()["cuda_kernels"]:
        pytest.fail(
            "a CUDA GPU is visible but crystal_ext was built without its CUDA kernels "
            "(rebuild where nvcc is on the PATH; `python -m crystal_ext.info` says how it was built)"
        )


_cuda_outcomes: dict[str, str] = {}


def _is_cuda_test(item) -> bool:
    return item.get_closest_marker("cuda") is not None or "cuda" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_cuda_test(item):
            _cuda_outcomes[item.nodeid] = "collected"


def pytest_runtest_logreport(report):
    if report.nodeid not in _cuda_outcomes:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _cuda_outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    ran = [o for o in _cuda_outcomes.values() if o != "collected"]
    if torch.cuda.is_available() and ran and all(o == "skipped" for o in ran):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: a CUDA GPU is visible but all {len(ran)} CUDA tests skipped "
                "(were the CUDA kernels compiled? see `python -m crystal_ext.info`)",
                red=True,
            )


# ---- end of the process-state and CUDA-test rules ---------------------------------------------


@pytest.fixture
def cuda():
    """The device for tests of the CUDA kernels: skips where no GPU is visible, fails where a GPU
    is visible but the extension was built without its CUDA kernels (a CPU-only build must not
    pass the GPU tests by skipping them)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    import crystal_ext

    assert crystal_ext.extension_available(), "a GPU is visible but the compiled extension is missing"
    assert crystal_ext.build_info()["cuda_kernels"], (
        "a GPU is visible but the extension was built without its CUDA kernels "
        "(rebuild without CRYSTAL_EXT_CPU_ONLY)"
    )
    return torch.device("cuda")
