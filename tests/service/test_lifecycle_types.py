"""The type checker refuses a batcher reached outside the lifecycle (service/lifecycle.py): mypy, as configured in
pyproject.toml, on a snippet that does it wrong and right. scripts/test.sh runs mypy first, so its cache is warm."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.server import REPO_ROOT

SNIPPET = textwrap.dedent(
    """
    import torch

    from service.lifecycle import Ready
    from service.model_manager import ModelManager


    async def wrong(models: ModelManager, x: torch.Tensor) -> None:
        served = models.find("m")
        await served.batcher.submit(x)  # line 10: no model, in any state, has a batcher of its own
        await served.state.loaded.batcher.submit(x)  # line 11: Loading, Failed and Unloaded hold nothing


    async def right(models: ModelManager, x: torch.Tensor) -> None:
        await models.ready_model("m").batcher.submit(x)
        served = models.find("m")
        if isinstance(served.state, Ready):
            await served.state.loaded.batcher.submit(x)
    """
)


def test_mypy_refuses_a_batcher_that_may_not_exist(tmp_path: Path):
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", str(snippet)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # The snippet's own errors (line, code), by file name (mypy's cache may replay them under an earlier tmp_path);
    # those in the modules it imports are the job of the project's own mypy run.
    errors = re.findall(r"/snippet\.py:(\d+): error: .*\[([a-z-]+)\]$", done.stdout, re.MULTILINE)
    assert done.returncode == 1, done.stdout + done.stderr
    assert errors == [("10", "attr-defined"), *[("11", "union-attr")] * 3], done.stdout
