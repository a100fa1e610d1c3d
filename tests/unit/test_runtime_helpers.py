"""The self-contained helpers that train.py prints from tpplan/runtime/helpers.py: tokenizer, packing,
learning-rate schedule, meta-device build, checkpoint discovery."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import SPECS
from tpplan.runtime.helpers import (
    build_byte_bpe_tokenizer,
    checkpoint_steps,
    cosine_lr_multiplier,
    materialize,
    pack_token_ids,
    parameters_on_meta,
)

CORPUS = SPECS / "data" / "tiny-alpaca.jsonl"
FINGERPRINT = """
import hashlib, json, sys
from tpplan.runtime.helpers import build_byte_bpe_tokenizer
texts = [json.loads(line)["text"] for line in open(sys.argv[1])]
tok = build_byte_bpe_tokenizer(texts, 512, 2)
print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(), len(tok))
"""


def texts():
    return [json.loads(line)["text"] for line in CORPUS.open()]


def test_byte_bpe_is_deterministic_across_processes():
    import hashlib

    here = build_byte_bpe_tokenizer(texts(), 512, 2)
    digest = hashlib.sha256(here.backend_tokenizer.to_str().encode()).hexdigest()
    other = subprocess.run([sys.executable, "-c", FINGERPRINT, str(CORPUS)], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == [digest, str(len(here))]
    assert len(here) == 512 and here.eos_token == "<|endoftext|>"
    sample = "def f(x):\n    return x  # ünïcode"
    assert here.decode(here(sample, add_special_tokens=False)["input_ids"]) == sample


def test_pack_token_ids_appends_eos_and_drops_the_tail():
    rows = pack_token_ids([[1, 2, 3], [4, 5], [6]], eos_id=0, length=4)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the last EOS does not fill a row
    assert rows.dtype == torch.long
    assert pack_token_ids([[1]], eos_id=0, length=4).shape == (0, 4)


def test_cosine_schedule_with_warmup():
    lr = [cosine_lr_multiplier(s, 4, 20, 0.1) for s in range(21)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and math.isclose(lr[12], 0.55) and math.isclose(lr[20], 0.1)
    assert all(a >= b for a, b in zip(lr[4:-1], lr[5:], strict=True))
    assert cosine_lr_multiplier(100, 0, 20, 0.1) == pytest.approx(0.1)  # past the end: the floor
    assert cosine_lr_multiplier(0, 0, 1, 0.0) == 1.0


def test_parameters_on_meta_keeps_buffers_and_materialize_restores_them():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
    )
    reference = AutoModelForCausalLM.from_config(config)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.model.embed_tokens.weight, torch.nn.Parameter)
    buffers = dict(model.named_buffers())
    assert buffers and not any(b.is_meta for b in buffers.values())
    materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buf)  # rotary inv_freq survived to_empty
    # the patch is gone afterwards
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_checkpoint_steps_lists_only_complete_ones(tmp_path):
    for name in ("step-00000004", "step-00000012", "step-00000008", ".step-00000016.partial", "other"):
        (tmp_path / name).mkdir()
    for name in ("step-00000004", "step-00000012", ".step-00000016.partial"):
        (tmp_path / name / "trainer.json").write_text("{}")
    assert checkpoint_steps(tmp_path) == [
        (4, str(tmp_path / "step-00000004")),
        (12, str(tmp_path / "step-00000012")),
    ]
    assert checkpoint_steps(tmp_path / "none") == []


def test_materialize_keeps_tied_weights_tied():
    """to_empty alone unties lm_head from the embedding of a plain (tp=1, no FSDP) model."""
    from transformers import LlamaConfig

    from tpplan.model.sources import build_model
    from tpplan.runtime.helpers import materialize, parameters_on_meta

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=64, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    with parameters_on_meta():
        model = build_model(config, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    count = len(list(model.parameters()))
    materialize(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    assert len(list(model.parameters())) == count
    assert model.model.rotary_emb.inv_freq.abs().sum() > 0  # computed buffers survive
