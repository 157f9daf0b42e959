"""A tiny random-weight Llama that vLLM can serve: the fleet's test model, built without torch.

Everything is derived from constants in this file (a fixed seed and a built-in corpus), so two
builds are byte-identical and a test host never needs a model hub. It generates nonsense, fast:
0.85 M parameters, 3.4 MB of weights.

Built by ``vllm-fleet lab model DEST``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 20240601
"""Seed of the weights; change it and every byte of model.safetensors changes."""

# float32 because numpy has no bfloat16 (writing bf16 would need ml_dtypes or hand-made tensors)
# and the model is too small for the dtype to matter for speed; vLLM CPU picks its compute dtype
# from this (see the vLLM notes in the report of roles.lab.tiny_model).
DTYPE = "float32"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]  # their ids are their positions: <s>=0, </s>=1, <unk>=2, <pad>=3

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 256,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "torch_dtype": DTYPE,
    "bos_token_id": SPECIAL_TOKENS.index(BOS),
    "eos_token_id": SPECIAL_TOKENS.index(EOS),
    "pad_token_id": SPECIAL_TOKENS.index(PAD),
}

# Llama-2 chat format; the tokenizer adds no <s> in chat requests, so the template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

CORPUS = """\
The fleet starts as a row of quiet machines with nothing on them but a fresh operating system. An
operator writes an inventory that names every host, the group it belongs to and the model it should
serve. From that one file the deploy installs packages, creates a service user, copies the weights,
writes a unit file and starts the server. When it finishes, each host answers on its port and the
load balancer in front spreads requests across all of them.

Language models read text as tokens, small pieces of words chosen by a tokenizer that was trained on
a large collection of writing. Common words become single tokens, while rare names are split into
several parts. A model predicts the next token from the ones before it, one step at a time, until it
writes an end marker or reaches the limit the caller asked for. Sampling with a higher temperature
makes the output more varied; a temperature of zero always takes the most likely token.

Memory is the first limit anyone meets when serving many requests at once. Every request keeps a
cache of keys and values for the tokens it has seen, and that cache grows with the length of the
conversation. The server sets aside a fixed budget for it when it starts, divides the budget into
blocks, and hands blocks to requests as they grow. When the blocks run out, new requests wait in a
queue until older ones finish and give their blocks back.

Good operations work is mostly patient and boring. Pin every version, record why each choice was
made, and keep a copy of everything a machine needs close to it, so that a broken network far away
cannot stop a repair at night. Check that a change did what it promised before moving to the next
host. Write the error message for the tired person who will read it at three in the morning: name
the setting, say what is wrong with it, and tell them exactly how to fix it.

Spring arrived late in the valley that year. Snow stayed on the northern slopes until the middle of
April, and the river ran high and brown with melt water for weeks. Farmers waited for the fields to
dry before they could plough, and the orchards flowered all at once in a single warm week, white and
pink against the dark hills. Children walked to school along the old road by the mill, counting the
swallows that came back to nest under the bridge.

The library in the town square keeps a long table by the window where people read newspapers in the
morning. In the afternoon students take it over with notebooks, laptops and cups of tea, working on
problems in mathematics, chemistry and history. The librarian knows most of them by name and keeps a
drawer of pencils, rulers and spare chargers for anyone who forgets theirs. On rainy evenings the
reading room stays open an hour longer, and the lamps make warm circles of light on the wood.

A good recipe for bread needs only flour, water, salt and yeast, but it asks for time and attention.
Mix the dough until it is smooth, cover it, and let it rise in a warm place until it has doubled.
Fold it gently, shape it into a round loaf, and let it rest again while the oven heats. Bake it hot
at first for a crisp crust, then lower the heat so the inside cooks through without burning. Let it
cool on a rack before cutting, however hard it is to wait.

Ships crossing the northern sea follow routes that change with the seasons. In winter storms come
quickly from the west, with waves taller than houses and wind that tears the tops off them. Captains
watch the barometer, listen to forecasts on the radio and keep well away from the rocky coast. In
summer the same water lies calm and grey under long pale evenings, and whales rise slowly beside the
hull, breathe out a cloud of mist, and sink again without a sound.

Numbers appear everywhere once you start looking for them: one, two, three, four, five, six, seven,
eight, nine, ten, twenty, fifty, a hundred, a thousand. Dates such as 2024-06-01, times like 09:30
and 17:45, prices of 3.50 or 12.99, and versions written as 0.32.0 or 2.13.0 all mix digits with
punctuation. Questions end with a question mark? Lists use commas, semicolons; and colons: brackets
(round), [square] and {curly}, quotes "double" and 'single', and symbols like @, #, %, & and *.
"""


def _tokenizer() -> Tokenizer:
    """Byte-level BPE (every byte is a token, so no input is ever <unk>) trained on CORPUS.

    The trainer breaks ties between equally frequent pairs by the pair itself, so the result does
    not depend on its thread count (checked with 1 and 8 threads, tokenizers 0.23).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The upper-case copy gives the trainer enough distinct words to fill the whole vocabulary
    # (sampled ids beyond the tokenizer's vocabulary would have no text).
    tokenizer.train_from_iterator([*CORPUS.splitlines(), *CORPUS.upper().splitlines()], trainer=trainer)
    # Completions get <s> in front, like Llama tokenizers; chat prompts have it from the template.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def _weights(config: dict = CONFIG) -> dict[str, np.ndarray]:
    """Hugging Face Llama tensor names and shapes, normal(0, 0.02) from SEED, RMSNorm weights at 1."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(config["num_hidden_layers"]):
        layer = f"model.layers.{n}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (q, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    rng = np.random.default_rng(SEED)
    return {
        name: np.ones(shape, DTYPE) if name.endswith("norm.weight")
        else rng.standard_normal(shape, dtype=DTYPE) * np.float32(0.02)
        for name, shape in shapes.items()  # dict order is fixed, so each tensor draws the same numbers
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build(dest: Path, **overrides) -> Path:
    """Write the model folder (config, weights, tokenizer, chat template) into ``dest``; return it.

    ``overrides`` change the architecture (e.g. ``num_key_value_heads=2``) for tests that need
    another shape; the tokenizer and vocabulary stay the same."""
    config = {**CONFIG, **overrides}
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", config)
    _write_json(dest / "generation_config.json",
                {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    save_file(_weights(config), str(dest / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer().save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    # transformers 5 reads the template from this file; older readers from tokenizer_config.json.
    (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    return dest

