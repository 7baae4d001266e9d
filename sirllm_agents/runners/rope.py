"""Re-rotating cached keys when tokens move to a new cache index.

Positions are cache indices (StreamingLLM): after an eviction a kept token at old index p sits at new index q, so
its key, rotated for p, must be rotated by ``q - p``. RoPE composes (R(a) R(b) = R(a + b)), so rotating the stored
key by the difference gives exactly the key the model would have computed at q. The attention scaling some RoPE
variants fold into cos/sin is already inside the stored key and must not be applied again.
"""

from __future__ import annotations

import torch
from torch import nn

# RoPE types whose inverse frequencies change with the sequence length: a stored key is not a pure rotation of a
# position-free key, so shifting it by a delta would silently give wrong keys.
_LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


class UnsupportedModelError(ValueError):
    """The model cannot be served with a re-rotated, evicting cache."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KeyRotator:
    """Rotates cached keys by per-token position deltas, with the model's own inverse frequencies, per layer."""

    def __init__(self, inv_freqs: list[torch.Tensor]):
        self.inv_freqs = [f.detach().to(torch.float32) for f in inv_freqs]

    @classmethod
    def from_model(cls, model: nn.Module) -> KeyRotator:
        config = model.config.get_text_config(decoder=True)
        rotary = _find_rotary_embedding(model)
        n_layers = config.num_hidden_layers
        if isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
            _check_rope_type(getattr(rotary, "rope_type", "default"), config)
            return cls([rotary.inv_freq] * n_layers)
        # Models with one RoPE per attention type (Gemma 3: local and global layers) keep `<type>_inv_freq` buffers.
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            rope_types = getattr(rotary, "rope_type", {})
            freqs = []
            for layer_type in layer_types:
                inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
                if inv_freq is None:
                    break
                _check_rope_type(rope_types.get(layer_type, "default"), config)
                freqs.append(inv_freq)
            else:
                return cls(freqs)
        raise UnsupportedModelError(
            f"{config.model_type}: could not find the rotary embedding's inverse frequencies; sirllm-agents needs a "
            "RoPE decoder-only model (Llama, Mistral, Qwen2/3, Phi-3, Gemma)"
        )

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor, layer: int) -> torch.Tensor:
        """Rotate ``keys`` [batch, heads, seq, head_dim] by ``delta`` [seq] positions, computing in float32.

        The angles themselves are taken in float64: ``delta * inv_freq`` reaches thousands of radians, where float32
        would lose about 1e-4 of them."""
        inv_freq = self.inv_freqs[layer].to(keys.device)
        rot_dim = 2 * inv_freq.numel()
        angles = delta.to(keys.device, torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().float(), angles.sin().float()
        k = keys.to(torch.float32)
        k_rot, k_pass = k[..., :rot_dim], k[..., rot_dim:]
        k_rot = k_rot * cos + _rotate_half(k_rot) * sin
        return torch.cat((k_rot, k_pass), dim=-1).to(keys.dtype)


def _find_rotary_embedding(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    config = model.config.get_text_config(decoder=True)
    raise UnsupportedModelError(
        f"{config.model_type}: the model has no rotary position embedding; sirllm-agents needs a RoPE decoder-only "
        "model (Llama, Mistral, Qwen2/3, Phi-3, Gemma)"
    )


def _check_rope_type(rope_type: str, config) -> None:
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"{config.model_type}: rope_type '{rope_type}' changes its frequencies with the sequence length, so cached "
            "keys cannot be re-rotated to new positions; use a checkpoint with default, linear, llama3 or yarn RoPE"
        )
