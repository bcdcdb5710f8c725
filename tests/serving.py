"""What the serving tests share besides fixtures (tests/serve/conftest.py): a server config on the tiny model,
an adapter's weights made random, a collector of one request's engine events, and an app served on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def randomize_adapter(run_dir: Path, seed: int, scale: float = 0.5) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.rundir import RunDir

    path = run_dir / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * scale for k, v in load_file(path).items()}
    save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
    path.with_suffix(".tmp").rename(path)
    RunDir(run_dir).write_manifest()  # the files changed: list them again


def serve_config(tiny_model_dir: Path, models: list[str], **overrides):
    from tunelab.config import ServeConfig

    # No fine-tuning service unless a test asks for it (tests/service/): no store, no supervisor polling it.
    return ServeConfig(base=str(tiny_model_dir), models=models, **{"precision": "fp32", "max_lora_rank": 8,
                                                                 "weight_layout": "plain", "fine_tuning": False,
                                                                 **overrides})


class Collected:
    """A request's events, gathered from the engine thread."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        from tunelab.serve.engine import Tokens

        if isinstance(event, Tokens):
            self.tokens.extend(event.ids)
        else:
            self.end = event
            self.done.set()

    def wait(self, timeout: float = 60.0) -> Collected:
        assert self.done.wait(timeout), "the engine did not finish the request"
        return self


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextmanager
def listening(app) -> Iterator[str]:  # noqa: ANN001
    """`app` served by uvicorn on a free port of 127.0.0.1, in a thread: its base URL while the block runs."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=60)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
