"""Test configuration: every Triton kernel runs under the interpreter on CPU tensors (no GPU on CI machines)."""

import os

import pytest

# Must be set before triton is first imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_cache(tmp_path_factory) -> str:
    """One Triton cache per test session: the compile tests' child processes (``compile_child``) build the same kernels
    (the kernel report, the NT-Xent launches, the bank kernel)."""
    return str(tmp_path_factory.getbasetemp() / "triton-cache")


@pytest.fixture(scope="session", autouse=True)
def _compile_children_early(request, triton_cache):
    """Start the compile children of the selected tests at once, in the order the tests will ask for them
    (``compile_child.start_early``): a test module maps each of its items to the args of the children it runs with
    ``compile_children(item)``."""
    from compile_child import start_early, stop_early

    commands = []
    for item in request.session.items:
        children = getattr(getattr(item, "module", None), "compile_children", None)
        for args in children(item) if children else []:
            if args not in commands:
                commands.append(args)
    if commands:
        start_early(commands, triton_cache)
    yield
    stop_early()


def pytest_unconfigure(config):
    """A session on a nearly full disk says so on its last line, which a log cut short keeps: the tests that write
    files then fail in ways that name other causes."""
    import shutil
    import tempfile

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if reporter is not None and free < 2 * 2**30:
        reporter.write_line(
            f"the disk holding {tempfile.gettempdir()} has {free / 2**20:.0f} MiB free: failures above may come "
            "from that",
            red=True,
        )
