"""tunelab.data.records: CSV and chat JSONL readers, and the errors they raise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import DataConfig
from tunelab.data.read import read_conversations
from tunelab.data.records import Message
from tunelab.errors import TunelabError


def read_csv(path, input_column: str, output_column: str, system_prompt: str | None):
    return read_conversations(DataConfig(path=path, format="csv", input_column=input_column,
                                         output_column=output_column, system_prompt=system_prompt))


def read_chat_jsonl(path, system_prompt: str | None = None):
    return read_conversations(DataConfig(path=path, format="chat_jsonl", system_prompt=system_prompt))

def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *objs: object) -> Path:
    return write(path, "".join(json.dumps(o) + "\n" for o in objs))


def chat(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# ---------------------------------------------------------------- CSV


def test_csv_with_column_mapping_and_system_prompt(tmp_path):
    path = write(tmp_path / "d.csv", "id,question,intent\n1,Where is my card?,card_arrival\n2,Rate today?,exchange_rate\n")
    cfg = DataConfig(path=path, format="csv", input_column="question", output_column="intent",
                     system_prompt="Classify the intent.")
    rows = read_conversations(cfg)
    assert [r.messages for r in rows] == [
        (Message("system", "Classify the intent."), Message("user", "Where is my card?"), Message("assistant", "card_arrival")),
        (Message("system", "Classify the intent."), Message("user", "Rate today?"), Message("assistant", "exchange_rate")),
    ]
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:3"]
    assert rows[0].answer == "card_arrival"
    assert rows[0].prompt_messages == rows[0].messages[:2]


def test_csv_without_system_prompt_and_with_bom_and_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", "\ufefftext\tlabel\n  hello  \t yes \n")
    (row,) = read_csv(path, "text", "label", None)
    assert row.messages == (Message("user", "hello"), Message("assistant", "yes"))


def test_csv_missing_column_names_line_1_and_the_header(tmp_path):
    path = write(tmp_path / "d.csv", "text,category\nhi,greet\n")
    with pytest.raises(TunelabError) as info:
        read_csv(path, "text", "label", None)
    assert info.value.where == f"{path}:1"
    assert "'label'" in info.value.what
    assert "['text', 'category']" in info.value.what
    assert "output_column" in info.value.fix


def test_csv_empty_cell_names_its_line(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nhi,greet\n\"two\nlines\",ok\nbye,\n")
    with pytest.raises(TunelabError) as info:
        read_csv(path, "text", "label", None)
    assert info.value.where == f"{path}:5"  # a quoted cell spans lines 3-4
    assert "empty 'label'" in info.value.what

    path = write(tmp_path / "e.csv", "text,label\n ,greet\n")
    with pytest.raises(TunelabError) as info:
        read_csv(path, "text", "label", None)
    assert info.value.where == f"{path}:2"
    assert "empty 'text'" in info.value.what


def test_empty_and_missing_files(tmp_path):
    header_only = write(tmp_path / "h.csv", "text,label\n")
    with pytest.raises(TunelabError, match="no examples"):
        read_conversations(DataConfig(path=header_only, format="csv"))
    with pytest.raises(TunelabError, match="no examples"):
        read_conversations(DataConfig(path=write(tmp_path / "e.jsonl", "\n\n"), format="chat_jsonl"))
    with pytest.raises(TunelabError, match="not found"):
        read_conversations(DataConfig(path=tmp_path / "missing.csv", format="csv"))


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(TunelabError, match="not UTF-8"):
        read_csv(path, "text", "label", None)


def test_csv_cell_with_unicode_line_separator(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\nhello\u2028world,greet\n")
    (row,) = read_csv(path, "text", "label", None)
    assert row.messages[0].content == "hello\u2028world"


# ---------------------------------------------------------------- chat JSONL


def test_chat_jsonl(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        chat(("user", "hi"), ("assistant", "hello")),
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b", "weight": 0}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
    )
    write(path, path.read_text() + "\n")  # blank lines are skipped
    rows = read_chat_jsonl(path, system_prompt="Default system.")
    assert rows[0].messages == (Message("system", "Default system."), Message("user", "hi"), Message("assistant", "hello"))
    assert rows[1].messages[0] == Message("system", "Be brief.")  # its own system message wins
    assert rows[1].messages[2] == Message("assistant", "b", weight=0)
    assert rows[1].answer == "d"
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:2"]


def test_chat_jsonl_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps(chat(("user", "a"), ("assistant", "b"))) + "\n\n{not json\n")
    with pytest.raises(TunelabError) as info:
        read_chat_jsonl(path)
    assert info.value.where == f"{path}:3"
    assert "invalid JSON" in info.value.what


def test_chat_jsonl_last_message_not_assistant(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", chat(("user", "a"), ("assistant", "b")),
                 chat(("user", "a"), ("assistant", "b"), ("user", "c")))
    with pytest.raises(TunelabError) as info:
        read_chat_jsonl(path)
    assert info.value.where == f"{path}:2"
    assert "'user'" in info.value.what and "assistant" in info.value.what


def test_chat_jsonl_unknown_role(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", chat(("user", "a"), ("assistant", "b")), chat(("human", "a"), ("assistant", "b")))
    with pytest.raises(TunelabError) as info:
        read_chat_jsonl(path)
    assert info.value.where.startswith(f"{path}:2")
    assert "messages[0]" in info.value.where
    assert "'human'" in info.value.what


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"msgs": []}, "missing 'messages'"),
        ([1, 2], "missing 'messages'"),
        (chat(("user", "a")), "no assistant message"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, "content must be a string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}, "weight"),
        ({"messages": ["hi", {"role": "assistant", "content": "b"}]}, "must be an object"),
    ],
)
def test_chat_jsonl_other_errors(tmp_path, obj, message):
    path = jsonl(tmp_path / "d.jsonl", obj)
    with pytest.raises(TunelabError, match=message) as info:
        read_chat_jsonl(path)
    assert info.value.where.startswith(f"{path}:1")


def test_chat_jsonl_with_unicode_line_separator_in_content(tmp_path):
    obj = chat(("user", "first\u2028second"), ("assistant", "ok"))
    path = write(tmp_path / "d.jsonl", json.dumps(obj, ensure_ascii=False) + "\n")
    (row,) = read_chat_jsonl(path)
    assert row.messages[0].content == "first\u2028second"



def test_records_in_memory_read_like_a_file_and_errors_name_the_record(tmp_path):
    from tunelab.data.records import Conversation

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    typed = Conversation((Message("user", "q3"), Message("assistant", "a3", weight=0), Message("user", "again"),
                          Message("assistant", "a3 again")), "mine:1")
    convs = read_conversations(DataConfig(system_prompt="Be brief."), records=[*rows, typed])
    assert [c.messages[-1].content for c in convs] == ["a0", "a1", "a2", "a3 again"]
    assert convs[3].messages[2].weight == 0 and all(c.messages[0].content == "Be brief." for c in convs)
    assert [c.source for c in convs] == ["records:1", "records:2", "records:3", "records:4"]
    alpaca = read_conversations(DataConfig(), records=[{"instruction": "hi", "output": "hello"}] * 2)
    assert alpaca[0].messages[-1].content == "hello"
    bad = [*rows, {"messages": [{"role": "bot", "content": "x"}]}]
    with pytest.raises(TunelabError, match=r"^records:4: messages\[0\].role: unknown role 'bot'"):
        read_conversations(DataConfig(), records=bad)


def test_no_path_and_no_records_is_a_clear_error():
    with pytest.raises(TunelabError, match="no data: the config sets no data.path.*records="):
        read_conversations(DataConfig())


def test_preference_pairs_for_supervised_tuning_say_how_to_train_on_them(tmp_path):
    """The error used to say preference tuning was not available; it is: objective dpo."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    with pytest.raises(TunelabError, match=r"holds preference pairs.*fix: set objective: dpo to train on preference"):
        read_conversations(DataConfig(path=path))
