"""The tiny test model: deterministic bytes, a config vLLM reads, tensors that match it."""

import hashlib
import json

import jinja2
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from roles.lab import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("tiny"))


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_byte_identical(model_dir, tmp_path):
    assert _digests(tiny_model.build(tmp_path)) == _digests(model_dir)


def test_build_writes_every_file(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]


def test_config_fields(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "vocab_size",
                                   "max_position_embeddings")} == {
        "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 256, "vocab_size": 2048, "max_position_embeddings": 2048}
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is False


def test_tensors_match_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                "lm_head.weight": (vocab, hidden)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        expected |= {f"{p}.self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        expected |= {f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                     f"{p}.mlp.down_proj.weight": (hidden, inter),
                     f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,)}
    tensors = load_file(model_dir / "model.safetensors")
    assert {name: t.shape for name, t in tensors.items()} == expected
    assert all(t.dtype == config["torch_dtype"] for t in tensors.values())
    assert 0.015 < tensors["lm_head.weight"].std() < 0.025


def test_tokenizer_round_trips_and_fills_the_vocabulary(model_dir):
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 2048
    assert [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<unk>", "<pad>")] == [0, 1, 2, 3]
    sentence = "Pin every version, and tell them exactly how to fix it: 0.32.0 at 09:30?"
    encoding = tokenizer.encode(sentence)
    assert encoding.ids[0] == tokenizer.token_to_id("<s>")
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == sentence


def test_tokenizer_config_and_chat_template(model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert (model_dir / "chat_template.jinja").read_text() == config["chat_template"] + "\n"
    rendered = jinja2.Template(config["chat_template"]).render(
        bos_token="<s>", eos_token="</s>",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert rendered == "<s><<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] Hi [/INST] Hello.</s>[INST] Bye [/INST]"
