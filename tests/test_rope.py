"""Re-rotation: a key computed at position p and rotated by q - p equals the key computed at q."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from sirllm_agents import Engine, UnsupportedModelError
from sirllm_agents.runners.rope import KeyRotator

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    # yarn folds an attention scaling into cos/sin: it is inside the stored key and must not be applied twice.
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def model_key(model, raw_key: torch.Tensor, position: int) -> torch.Tensor:
    """The key as the model computes it (float32 angles)."""
    cos, sin = model.model.rotary_emb(raw_key, position_ids=torch.tensor([[position]]))
    return apply_rotary_pos_emb(raw_key, raw_key, cos, sin)[1]


def exact_key(model, raw_key: torch.Tensor, position: int) -> torch.Tensor:
    """The same key in float64, with the model's inverse frequencies and attention scaling."""
    rotary = model.model.rotary_emb
    angles = position * rotary.inv_freq.double()
    angles = torch.cat((angles, angles))
    key = raw_key.double()
    return rotary.attention_scaling * (key * angles.cos() + rotate_half(key) * angles.sin())


def rerotation_error(model, key_fn, old: list[int], new: list[int]) -> float:
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 1, 16)  # [batch, kv heads, token, head_dim]
    stored = torch.cat([key_fn(model, raw, p).float() for p in old], dim=2)
    expected = torch.cat([key_fn(model, raw, q) for q in new], dim=2)
    moved = KeyRotator.from_model(model).rotate(stored, torch.tensor(new) - torch.tensor(old), layer=0)
    return float((moved.double() - expected.double()).abs().max())


@pytest.mark.parametrize("rope", list(ROPES))
def test_rerotated_key_equals_key_computed_at_the_new_position(make_tiny_llama, rope):
    model = make_tiny_llama(rope_parameters=ROPES[rope], max_position_embeddings=4096)
    if rope == "yarn":
        assert model.model.rotary_emb.attention_scaling != 1.0
    # Against the model's own float32 keys, at cache-sized positions.
    assert rerotation_error(model, model_key, [5, 130, 200, 255], [0, 4, 7, 100]) < 1e-5
    # Far positions, against exact keys (the model's float32 angles are themselves only ~1e-5 exact there).
    assert rerotation_error(model, exact_key, [900, 1500, 2047, 3000, 4000], [4, 7, 100, 1000, 2999]) < 1e-5


def test_length_dependent_rope_is_refused_at_construction(tokenizer, make_tiny_llama):
    model = make_tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic' changes its frequencies"):
        Engine(model, tokenizer=tokenizer)
