"""README's "Python API" section runs, as written, on the tiny model (`tl.train`, `tl.evaluate`, the registry)."""

from __future__ import annotations

import json
import re

from helpers import REPO, classification_rows

README = (REPO / "README.md").read_text(encoding="utf-8")


def python_api_blocks() -> list[str]:
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_python_api_section_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    blocks = python_api_blocks()
    assert len(blocks) == 2 and "tl.train(cfg)" in blocks[0]
    monkeypatch.chdir(tmp_path)  # the files the example names, beside it
    monkeypatch.setenv("TUNELAB_REGISTRY", str(tmp_path / "registry"))
    rows = classification_rows()
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}) + "\n"
        for text, label in rows))
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {{path: train.jsonl}}\n"
        "train: {precision: fp32, batch_size: 8, learning_rate: 1.0e-2, compile_kernels: false}\n"
        "eval: {max_rows: 8, forgetting_probe: false}\n")
    namespace: dict = {"my_labelled_messages": rows}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code

    out = capsys.readouterr().out
    assert "75 examples, 0 errors" in out and " steps, about " in out and "epochs = 2 (config" in out
    assert re.search(r"accuracy: \d\.\d{3} \(base zero-shot: p = ", out)
    import tunelab as tl

    first, second = sorted((tmp_path / "runs").iterdir())
    assert tl.RunDir(first).manifest().evaluations == {"held-out": "eval.json"}
    assert (second / "records.jsonl").is_file()  # the second block's run, from memory
    versions = tl.Registry().versions("banking")
    assert [v.ref for v in versions] == ["banking@1"]
    assert ("not promoted:" in out) == (tl.Registry().aliases("banking") == {})
    assert namespace["model"] is not None and namespace["tokenizer"].chat_template
    assert namespace["record"].verified and not namespace["record"].failed()
    assert (tmp_path / "out" / "banking.gguf").is_file() and (tmp_path / "out" / "banking.export.json").is_file()
