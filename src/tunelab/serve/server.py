"""Start a server: load the base once, wrap its linear layers for adapter slots, start the engine, run uvicorn.

    tunelab serve [--model banking@production --model runs/x] [--host 0.0.0.0 --port 8000]

    from tunelab.serve.server import build_state; state = build_state(ServeConfig(...))   # tests, embedding

SIGTERM or Ctrl-C: uvicorn stops accepting connections and lets the responses in flight end (up to
SHUTDOWN_GRACE_S), then re-raises the signal, so the process ends by it (exit status 143 for SIGTERM).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from sqlalchemy import select

from tunelab.config import PACKED_MIN_SPEEDUP, ServeConfig
from tunelab.errors import TunelabError
from tunelab.model.kernels.packed import pack_linears, packing_speedup
from tunelab.model.load import decoder_layers, load_model, load_tokenizer, resolve_model, weights_fingerprint
from tunelab.model.precision import choose_serving_precision
from tunelab.registry import Registry
from tunelab.serve import native_lora
from tunelab.serve.adapters import SlotTable
from tunelab.serve.app import ServerState, create_app
from tunelab.serve.catalog import Catalog, NotServable, PrivateModels, UnknownModel
from tunelab.serve.engine import Engine
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.multi_lora import wrap_linears
from tunelab.serve.structured import Grammars
from tunelab.service.checkpoint_models import checkpoint_run, split_checkpoint_name
from tunelab.service.files import Storage
from tunelab.service.keys import DEFAULT_PROJECT, any_keys, project_id
from tunelab.service.routes import Service
from tunelab.service.store import FineTunedModel, Store
from tunelab.service.supervisor import Supervisor, SupervisorConfig

log = logging.getLogger("tunelab.serve")
SHUTDOWN_GRACE_S = 30.0
PACKED_ROWS_HINT = 16  # the rows oneDNN lays packed weights out for; any number of rows still works


def build_state(cfg: ServeConfig, registry: Registry | None = None) -> ServerState:
    """Everything a server holds, engine started; `registry` defaults to the user's ($TUNELAB_REGISTRY)."""
    threads = cfg.threads or engine_threads()
    torch.set_num_threads(threads)
    log.info("threads: %d for the engine (%s)", threads, "set" if cfg.threads else
             f"{len(os.sched_getaffinity(0))} cores, one kept for HTTP, tokenizing and streaming")
    prefill_threads = cfg.prefill_threads or len(os.sched_getaffinity(0))
    if prefill_threads != threads:
        log.info("threads: %d for a step with %d or more prompt tokens (%s)", prefill_threads,
                 cfg.prefill_parallel_tokens, "set" if cfg.prefill_threads else "all cores")
    precision = choose_serving_precision(cfg.precision)
    log.info("precision: %s", precision.reason)
    resolved = resolve_model(cfg.base)
    tokenizer = load_tokenizer(cfg.base)
    registry = registry if registry is not None else Registry()
    service = open_service(cfg, registry) if cfg.fine_tuning else None
    catalog = Catalog(cfg.base, tokenizer, weights_fingerprint(resolved), cfg.max_lora_rank, cfg.models, registry,
                      private=private_models(service) if service is not None else None)
    for name in cfg.models:  # named explicitly: refuse to start rather than serve without it (before loading)
        try:
            catalog.resolve(name)
        except UnknownModel:
            raise TunelabError(f"--model {name} is neither a run directory nor a model in the registry at "
                               f"{registry.root}", fix="check the name with `tunelab models list`, or pass a "
                               "finished run directory") from None
        except NotServable as exc:
            raise TunelabError(f"--model {name} cannot be served: {exc}", fix="serve another version, or "
                               "leave it out") from None
    catalog.preload()
    model, tokenizer = load_model(resolved, dtype=precision.weights_dtype)
    model.eval()
    # Every linear layer of every decoder layer can take an adapter: which ones an adapter targets is per slot.
    prefix = {id(m): n for n, m in model.named_modules()}
    names = [f"{prefix[id(layer)]}.{n}" for layer in decoder_layers(model) for n, m in layer.named_modules()
             if isinstance(m, torch.nn.Linear)]
    layers = wrap_linears(model, names, cfg.max_adapters + 1, cfg.max_lora_rank)
    if _pack_weights(cfg.weight_layout, precision.weights_dtype):
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        pack_linears(model, [f"{n}.base" for n in names] + [head], rows_hint=PACKED_ROWS_HINT)
    slots = SlotTable(layers, cfg.max_adapters, catalog.adapter_configs)
    native = native_lora.load() if cfg.lora_kernel in ("auto", "fused") else None
    if cfg.lora_kernel == "fused" and native is None:
        raise TunelabError("lora_kernel fused: the native LoRA update could not be built here (the log says why)",
                           fix="install a C++ compiler (g++), or leave lora_kernel at auto")
    log.info("LoRA update: %s", "native in decode steps, torch operators in prompt passes" if native is not None
             else f"torch operators ({cfg.lora_kernel})")
    engine = Engine(model, slots, precision, pad_token_id=tokenizer.pad_token_id, max_batch_rows=cfg.max_batch_rows,
                    token_budget=cfg.token_budget, max_adapters_per_step=cfg.max_adapters_per_step,
                    queue_size=cfg.queue_size, lora_kernel=cfg.lora_kernel, native_lora=native,
                    prefill_threads=prefill_threads, prefill_parallel_tokens=cfg.prefill_parallel_tokens)
    engine.start()
    if service is not None and service.supervisor is not None:
        service.supervisor.start()
    return ServerState(cfg, engine, catalog, ServeMetrics(engine), model.config.max_position_embeddings,
                       Grammars(model.config.vocab_size), service=service)


def open_service(cfg: ServeConfig, registry: Registry | None = None) -> Service:
    """The fine-tuning service: its store (migrated), storage, and a supervisor unless job_concurrency is 0."""
    storage = Storage.at(cfg.storage)
    db_url = cfg.db or storage.default_db
    store = Store.open(db_url)
    supervisor = None
    if cfg.job_concurrency:
        supervisor = Supervisor(store, storage, SupervisorConfig(
            db_url=db_url, base=cfg.base, concurrency=cfg.job_concurrency,
            heartbeat_seconds=cfg.worker_heartbeat_seconds, stale_seconds=cfg.worker_stale_seconds,
            max_attempts=cfg.job_max_attempts, checkpoint_every=cfg.job_checkpoint_every))
    log.info("fine-tuning: jobs in %s, files and runs under %s, %s", _safe_url(db_url), storage.root,
             f"{cfg.job_concurrency} at a time" if cfg.job_concurrency else "queued for another host (concurrency 0)")
    if not cfg.api_keys and not any_keys(store):
        log.warning("no API keys: every request acts for the project 'default' (create one with `tunelab keys "
                    "create --project NAME`; the first key closes the server to requests without one)")
    return Service(store, storage, supervisor, cfg.base, cfg.max_upload_bytes, cfg.job_checkpoint_every,
                   project_id(store, DEFAULT_PROJECT), registry, cfg.max_lora_rank)


def private_models(service: Service) -> PrivateModels:
    def run_dir(name: str, project: str | None) -> Path | None:
        checkpoint = split_checkpoint_name(name)  # ft:...:ckpt-step-N: that checkpoint of the model
        with service.store.session() as db:
            model = db.get(FineTunedModel, checkpoint[0] if checkpoint else name)
        if model is None or model.project_id != project:
            return None
        return checkpoint_run(Path(model.run_dir), checkpoint[1]) if checkpoint else Path(model.run_dir)

    def listed(project: str | None) -> list[tuple[str, int]]:
        with service.store.session() as db:
            return [(m.id, m.created_at) for m in db.scalars(
                select(FineTunedModel).where(FineTunedModel.project_id == project)
                .order_by(FineTunedModel.created_at, FineTunedModel.id))]

    return PrivateModels(run_dir, listed)


def _safe_url(url: str) -> str:
    """A database URL for the log, without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{rest.split('@', 1)[1]}"
    return url


def _pack_weights(setting: str, dtype: torch.dtype) -> bool:
    if setting == "plain":
        log.info("weights: plain (set)")
        return False
    speedup = packing_speedup(dtype, repeats=1 if setting == "packed" else 15)
    if setting == "packed":
        if speedup is None:
            raise TunelabError(f"weight_layout packed: this torch cannot pack {dtype} weights for oneDNN (its "
                               "mkldnn linear operators are missing or failed a check)",
                               fix="set weight_layout to auto or plain")
        log.info("weights: packed (set)")
        return True
    if speedup is None:
        log.info("weights: plain (this torch cannot pack them for oneDNN)")
        return False
    packed = speedup >= PACKED_MIN_SPEEDUP
    log.info("weights: %s (a decode-sized product ran %.2fx as fast packed, measured at start)",
             "packed" if packed else "plain", speedup)
    return packed


def engine_threads() -> int:
    """All cores but one: the HTTP side (parsing, the chat template, tokens to text, SSE) needs a core of its own.

    torch's worker threads wait for work by spinning, so on a small machine an HTTP thread that must share their
    cores can stall every step: while bench/serve_throughput.py was being written on a busy 2-core VM, the server
    with both cores given to torch ran many times slower than with one (docs/benchmarks.md, the serving section;
    not yet measured on an idle machine).
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


def serve(cfg: ServeConfig) -> None:
    """Run until SIGTERM / Ctrl-C."""
    import uvicorn

    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_keys and not (
            cfg.fine_tuning and any_keys(Store.open(cfg.db or Storage.at(cfg.storage).default_db))):
        log.warning("warning: serving on %s with no API key: anyone who can reach this port can use the models "
                    "(set --api-key, or bind 127.0.0.1)", cfg.host)
    state = build_state(cfg)
    app = create_app(state)
    names = ", ".join(name for name, _ in state.catalog.listed())
    log.info("serving: %s (the address follows, from uvicorn; the API is under /v1)", names)
    try:
        # log_level info for uvicorn's "running on http://HOST:PORT" (the real port when --port 0); no access log
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S))
    finally:
        if state.service is not None and state.service.supervisor is not None:
            state.service.supervisor.stop()  # its workers go on: a restarted server adopts them
        state.engine.stop(grace_seconds=SHUTDOWN_GRACE_S)
