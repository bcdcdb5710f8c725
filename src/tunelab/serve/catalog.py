"""Model names a request may use, resolved on every request.

    smollm2-135m-instruct     the base model (its name, or the path it was started with)
    banking@production        a registry alias: resolved per request, so a promote or rollback
    banking@2, banking        a version, the latest version      takes effect on the next request
    runs/banking77-2026...    a run directory given with --model, named as given
    ft:base:proj:sfx:abc...   a fine-tuning job's model (tunelab/service/), for its own project only

A request for anything else is a 404, never the base model in its place. Each adapter is checked
once, the first time its folder is named (serve/adapters.check_adapter, and the template canary on
the tokenizer it was trained with); a refused adapter is a 400 with the reason. The response echoes
the name the request used; a chat without a system message gets the run's system prompt, as every
training example did (data.system_prompt). The weights are those its name resolved to when it arrived, so a request
in flight finishes on the version it started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tunelab.errors import TunelabError
from tunelab.model.template_canary import check_recorded_template
from tunelab.registry import Registry
from tunelab.rundir import finished
from tunelab.serve.adapters import AdapterRef, check_adapter

log = logging.getLogger("tunelab.serve")


@dataclass(frozen=True)
class Servable:
    adapter: AdapterRef | None  # None: the base model
    tokenizer: PreTrainedTokenizerBase  # with the chat template it was trained with
    stop_token_ids: frozenset[int]  # that template's end of turn
    created: int  # Unix seconds
    system_prompt: str | None = None  # the run's data.system_prompt: put first when a chat has no system message


class UnknownModel(Exception):
    pass


@dataclass(frozen=True)
class PrivateModels:
    """The fine-tuning service's models (`ft:...`), each servable by its own project only."""

    run_dir: Callable[[str, str | None], Path | None]  # (name, project) -> the run directory, or None
    listed: Callable[[str | None], list[tuple[str, int]]]  # project -> (name, created) of its fine-tunes


class NotServable(Exception):
    pass


class Catalog:
    def __init__(self, base_name: str, base_tokenizer: PreTrainedTokenizerBase, base_fingerprint: str,
                 max_rank: int, models: list[str], registry: Registry | None,
                 private: PrivateModels | None = None) -> None:
        self.base_name = base_name
        self.base = Servable(None, base_tokenizer, _stops(base_tokenizer), int(time.time()))
        self.base_fingerprint = base_fingerprint
        self.adapter_configs: dict[str, dict] = {}  # folder -> its adapter_config.json, checked (the slots read it)
        self.max_rank = max_rank
        self.registry = registry
        self.run_dirs = {m: Path(m) for m in models if Path(m).is_dir()}
        given = [m for m in models if m not in self.run_dirs]
        self.registry_names = {m.partition("@")[0] for m in given} if models else None  # None: every name
        self._checked: dict[str, Servable | NotServable] = {}  # folder -> checked adapter, or why not
        self._run_keys = {name: str(path.resolve()) for name, path in self.run_dirs.items()}
        self.private = private

    def resolve(self, name: str, project: str | None = None) -> Servable:
        """The weights and template `name` stands for now, for a request of `project` (its fine-tunes are
        private); UnknownModel or NotServable otherwise."""
        if name == self.base_name:
            return self.base
        if name in self.run_dirs:
            return self._check(self.run_dirs[name], name)
        if name.startswith("ft:"):
            folder = self.private.run_dir(name, project) if self.private is not None else None
            if folder is None:
                raise UnknownModel(name)
            return self._check(folder, name)
        if self.registry is None or "/" in name or (
                self.registry_names is not None and name.partition("@")[0] not in self.registry_names):
            raise UnknownModel(name)
        try:
            version = self.registry.resolve(name)
        except TunelabError:
            raise UnknownModel(name) from None
        return self._check(version.path, name)

    def fixed(self, name: str) -> Servable | None:
        """`resolve(name)` without any I/O when the name cannot change meaning (the base, a run directory checked
        before); None otherwise."""
        if name == self.base_name:
            return self.base
        folder = self.run_dirs.get(name)
        checked = self._checked.get(self._run_keys.get(name, "")) if folder is not None else None
        return checked if isinstance(checked, Servable) else None

    def listed(self, project: str | None = None) -> list[tuple[str, int]]:
        """(id, created) of every name `resolve` accepts and can serve: the base, each run directory, for
        each registry name its versions and aliases, and the project's fine-tunes."""
        names = [(self.base_name, self.base.created)]
        if self.private is not None:
            names.extend(self.private.listed(project))
        candidates = list(self.run_dirs)
        if self.registry is not None:
            for version in self.registry.versions():
                if self.registry_names is not None and version.name not in self.registry_names:
                    continue
                candidates.append(version.ref)
                candidates.extend(f"{version.name}@{alias}" for alias in version.aliases)
        for name in candidates:
            try:
                names.append((name, self.resolve(name).created))
            except (UnknownModel, NotServable):
                continue
        return names

    def preload(self) -> None:
        """Check every servable name at start, so a refused adapter is reported (in the log) before traffic."""
        for name in list(self.run_dirs) + ([v.ref for v in self.registry.versions()] if self.registry else []):
            try:
                self.resolve(name)
            except NotServable as exc:
                log.warning("not serving %s: %s", name, exc)
            except UnknownModel:
                pass

    def _check(self, folder: Path, name: str) -> Servable:
        key = str(folder.resolve())
        if key not in self._checked:
            try:
                self._checked[key] = self._load(folder, key, name)
            except TunelabError as exc:
                self._checked[key] = NotServable(str(exc))
        checked = self._checked[key]
        if isinstance(checked, NotServable):
            raise checked
        return checked

    def _load(self, folder: Path, key: str, name: str) -> Servable:
        config = check_adapter(folder, self.base_fingerprint, self.max_rank, where=name)
        run = finished(folder)
        tokenizer = AutoTokenizer.from_pretrained(run.path / "tokenizer")
        check_recorded_template(run.data().chat_template.model_dump(), tokenizer, where=name, run_dir=run.path)
        self.adapter_configs[key] = config
        created = int((run.path / "manifest.json").stat().st_mtime)
        return Servable(AdapterRef(key, run.path), tokenizer, _stops(tokenizer), created,
                        run.config().data.system_prompt)


def _stops(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The end-of-turn token(s): the tokenizer's eos (tunelab trains on it, and the canary checks it)."""
    return frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
