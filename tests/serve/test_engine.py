"""The engine against the reference: greedy answers through continuous batching, with adapters mixed in one
batch (and base rows beside them), equal plain PEFT generating one prompt at a time, in fp32."""

from __future__ import annotations

import itertools

import pytest

from serving import Collected, serve_config, wait_until

PROMPTS = ["where is my card", "help with rate", "good morning", "is the phone ok", "thank you", "two plus two"]
MAX_NEW = 12


def _prompt_ids(tokenizer, text: str) -> list[int]:
    from tunelab.data.records import Message
    from tunelab.data.tokenize import render_prompt

    return render_prompt(tokenizer, [Message("user", text)])


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapter_runs) -> dict[tuple[str | None, str], list[int]]:
    """(adapter name or None, prompt) -> the greedy answer's token ids: plain PEFT, fp32, batch of one."""
    from peft import PeftModel

    from tunelab.evaluation.generate import generate
    from tunelab.model.load import load_model, resolve_model
    from tunelab.model.precision import Precision

    out = {}
    for name in [None, *adapter_runs]:
        base, tokenizer = load_model(resolve_model(str(tiny_model_dir)))
        model = base if name is None else PeftModel.from_pretrained(base, adapter_runs[name] / "adapter")
        model.eval()
        prompts = [_prompt_ids(tokenizer, p) for p in PROMPTS]
        run = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=1,
                       precision=Precision(False, "cpu", "test"), share_prefix=False)
        out.update({(name, p): g.token_ids for p, g in zip(PROMPTS, run.generations)})
    return out


def _state(tiny_model_dir, adapter_runs, tmp_path_factory, **overrides):
    from tunelab.registry import Registry
    from tunelab.serve.server import build_state

    registry = Registry(tmp_path_factory.mktemp("registry"))
    cfg = serve_config(tiny_model_dir, [str(p) for p in adapter_runs.values()], **overrides)
    return build_state(cfg, registry=registry)


@pytest.fixture(scope="module")
def state(tiny_model_dir, adapter_runs, tmp_path_factory):
    state = _state(tiny_model_dir, adapter_runs, tmp_path_factory, max_batch_rows=8, token_budget=64)
    yield state
    state.engine.stop(grace_seconds=5)


def _submit(state, adapter_runs, name: str | None, text: str, **kwargs) -> Collected:
    from tunelab.serve.engine import Request

    servable = state.catalog.resolve(str(adapter_runs[name]) if name else state.catalog.base_name)
    collected = Collected()
    request = Request(_prompt_ids(servable.tokenizer, text), servable.adapter, kwargs.pop("max_new_tokens", MAX_NEW),
                      servable.stop_token_ids, collected, **kwargs)
    collected.request = request
    state.engine.submit(request)
    return collected


def _every_model_answers_as_its_reference(state, adapter_runs, references, prompts: list[str]) -> None:
    """Each prompt to the base and to every adapter, all submitted at once."""
    pending = [(name, prompt, _submit(state, adapter_runs, name, prompt))
               for prompt, name in itertools.product(prompts, [None, *adapter_runs])]
    for name, prompt, got in pending:
        assert got.wait().tokens == references[(name, prompt)], (name, prompt)


def test_the_adapters_answer_differently(references, adapter_runs):
    """Else the tests below could not tell a request served with the wrong adapter."""
    for prompt in PROMPTS:
        answers = [tuple(references[(name, prompt)]) for name in [None, *adapter_runs]]
        assert len(set(answers)) == len(answers), prompt


def test_each_model_alone_matches_the_reference(state, references, adapter_runs):
    for name in [None, *adapter_runs]:
        for prompt in PROMPTS[:2]:
            got = _submit(state, adapter_runs, name, prompt).wait()
            assert got.tokens == references[(name, prompt)], (name, prompt)


def test_a_mixed_batch_matches_the_reference(state, references, adapter_runs):
    """Every model's requests at once, interleaved: base rows beside two ranks and two sets of target modules."""
    steps_before = dict(state.engine.stats.batch_rows)
    pending = [(name, prompt, _submit(state, adapter_runs, name, prompt))
               for prompt, name in itertools.product(PROMPTS, [None, *adapter_runs])]
    for name, prompt, got in pending:
        assert got.wait().tokens == references[(name, prompt)], (name, prompt)
    batched = {rows: n - steps_before.get(rows, 0) for rows, n in state.engine.stats.batch_rows.items()}
    assert max(rows for rows, n in batched.items() if n > 0) == 8, "the batch never filled its 8 rows"
    assert state.engine.running() == 0 and all(r == 0 for r in state.engine.slots.refs)


@pytest.mark.parametrize("kernel", ["grouped", "masked", "gathered", "segmented", "fused"])
def test_every_lora_kernel_gives_the_same_answers(kernel, tiny_model_dir, adapter_runs, tmp_path_factory, references):
    state = _state(tiny_model_dir, adapter_runs, tmp_path_factory, max_batch_rows=6, lora_kernel=kernel)
    try:
        _every_model_answers_as_its_reference(state, adapter_runs, references, PROMPTS[:3])
    finally:
        state.engine.stop(grace_seconds=5)


def test_a_prompt_heavy_step_runs_on_the_prefill_threads_and_decoding_on_the_others(tiny_model_dir, adapter_runs,
                                                                                    tmp_path_factory, references):
    """Answers are the same; the step that computes many prompt tokens ran on 2 threads, every other on 1."""
    import torch

    state = _state(tiny_model_dir, adapter_runs, tmp_path_factory, max_batch_rows=8, threads=1, prefill_threads=2,
                   prefill_parallel_tokens=40)
    seen: list[tuple[int, int]] = []  # (tokens in the forward, torch threads while it ran), on the engine thread
    body = state.engine.body

    def recording_body(*args, **kwargs):
        seen.append((kwargs["input_ids"].numel(), torch.get_num_threads()))
        return body(*args, **kwargs)

    state.engine.body = recording_body
    try:
        alone = _submit(state, adapter_runs, None, PROMPTS[0], max_new_tokens=3).wait()  # one prompt: < 40 tokens
        _every_model_answers_as_its_reference(state, adapter_runs, references, PROMPTS[:3])
    finally:
        state.engine.stop(grace_seconds=5)
    assert alone.tokens == references[(None, PROMPTS[0])][:3]
    prompt_passes = [(tokens, threads) for tokens, threads in seen if tokens > 8]  # decode steps: one per row
    decode_steps = [(tokens, threads) for tokens, threads in seen if tokens <= 8]
    assert prompt_passes[0][1] == 1, "the first request's prompt alone is under prefill_parallel_tokens"
    assert any(threads == 2 for _, threads in prompt_passes), prompt_passes
    assert decode_steps and {threads for _, threads in decode_steps} == {1}


def test_adapters_evicted_and_reloaded_under_load_still_answer_right(tiny_model_dir, adapter_runs, tmp_path_factory,
                                                                        references):
    """Two slots for three adapters: slots are freed and refilled while other rows decode (vLLM #47724 served a
    request with another tenant's adapter)."""
    state = _state(tiny_model_dir, adapter_runs, tmp_path_factory, max_batch_rows=4, max_adapters=2,
                   max_adapters_per_step=2)
    try:
        order = [None, "r4", "r8", "qv", "r8", None, "qv", "r4", "r4", "qv", "r8", None] * 2
        pending = [(name, prompt, _submit(state, adapter_runs, name, prompt))
                   for name, prompt in zip(order, itertools.cycle(PROMPTS))]
        for name, prompt, got in pending:
            assert got.wait().tokens == references[(name, prompt)], (name, prompt)
        assert state.engine.slots.loads > 3, "no adapter was ever evicted and loaded again"
    finally:
        state.engine.stop(grace_seconds=5)


def test_a_cancelled_request_frees_its_row_and_slot(state, adapter_runs):
    got = _submit(state, adapter_runs, "r4", "good morning", max_new_tokens=200)
    wait_until(lambda: state.engine.running() == 1)
    got.request.cancelled = True
    wait_until(lambda: state.engine.running() == 0)
    assert all(r == 0 for r in state.engine.slots.refs)


def test_a_seeded_sample_does_not_depend_on_its_neighbours(state, adapter_runs):
    alone = _submit(state, adapter_runs, "r8", "thank you", temperature=1.0, seed=7).wait().tokens
    crowd = [_submit(state, adapter_runs, name, p, temperature=0.8, seed=i)
             for i, (name, p) in enumerate(itertools.product(["r4", None], PROMPTS[:3]))]
    again = _submit(state, adapter_runs, "r8", "thank you", temperature=1.0, seed=7)
    for c in crowd:
        c.wait()
    assert again.wait().tokens == alone
    other_seed = _submit(state, adapter_runs, "r8", "thank you", temperature=1.0, seed=8).wait().tokens
    assert other_seed != alone


def test_a_json_row_is_constrained_and_its_neighbours_are_not(state, references, adapter_runs):
    """The grammar's mask applies to its own row only: unconstrained rows in the same steps keep their answers."""
    import json

    from tunelab.serve.protocol import ResponseFormat

    tokenizer = state.catalog.base.tokenizer
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    constraint = state.grammars.constraint(fmt, tokenizer, state.catalog.base.stop_token_ids)
    pending = [(name, prompt, _submit(state, adapter_runs, name, prompt)) for name, prompt in
               [(None, PROMPTS[0]), ("r4", PROMPTS[1])]]
    constrained = _submit(state, adapter_runs, "r8", PROMPTS[2], max_new_tokens=120, constraint=constraint)
    pending += [(name, prompt, _submit(state, adapter_runs, name, prompt)) for name, prompt in
                [("qv", PROMPTS[3]), (None, PROMPTS[4])]]
    for name, prompt, got in pending:
        assert got.wait().tokens == references[(name, prompt)], (name, prompt)
    got = constrained.wait()
    assert got.end.reason == "stop", tokenizer.decode(got.tokens)
    assert json.loads(tokenizer.decode(got.tokens)) in ({"ok": True}, {"ok": False})


def test_in_bf16_with_packed_weights_every_adapter_still_acts(tiny_model_dir, adapter_runs, tmp_path_factory):
    """What `auto` picks where bf16 products are native and packing pays: the adapters' deltas (kept in fp32
    slots) must survive the bf16 base and its packed products, or every fine-tune would answer as the base."""
    import torch

    from tunelab.model.kernels.packed import PackedLinear, packing_speedup

    layout = "packed" if packing_speedup(torch.bfloat16, rows=2, k=16, n=16, repeats=1) else "plain"
    state = _state(tiny_model_dir, adapter_runs, tmp_path_factory, max_batch_rows=8, precision="bf16",
                   weight_layout=layout)
    try:
        assert next(state.engine.model.parameters()).dtype == torch.bfloat16
        packed = [m for m in state.engine.model.modules() if isinstance(m, PackedLinear)]
        assert len(packed) == (0 if layout == "plain" else 2 * 7 + 1)  # 2 layers x 7 linears, and the head
        pending = {name: _submit(state, adapter_runs, name, PROMPTS[0]) for name in [None, *adapter_runs]}
        answers = {name: tuple(got.wait().tokens) for name, got in pending.items()}
        assert all(len(a) == MAX_NEW for a in answers.values() if a)
        assert len(set(answers.values())) == len(answers), answers
        assert state.engine.cache.buffers[0][0].dtype == torch.float32  # the attention of decode steps in fp32
    finally:
        state.engine.stop(grace_seconds=5)


def test_packed_weights_asked_for_where_torch_cannot_pack_them_is_a_clear_error(tiny_model_dir, adapter_runs,
                                                                                tmp_path_factory, monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.serve import server

    monkeypatch.setattr(server, "packing_speedup", lambda dtype, repeats=15: None)
    with pytest.raises(TunelabError) as caught:
        _state(tiny_model_dir, adapter_runs, tmp_path_factory, weight_layout="packed")
    assert "weight_layout packed" in str(caught.value) and "auto or plain" in str(caught.value)
