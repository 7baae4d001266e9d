"""The PyTorch backend: a transformers causal LM, its KV cache as a ``DynamicCache``, keys re-rotated in PyTorch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .base import surprisal
from .rope import KeyRotator


class TorchBackend:
    """A loaded transformers model (any device and dtype) serving any number of :class:`TorchRunner`."""

    name = "torch"

    def __init__(self, weights: PreTrainedModel):
        self.weights = weights.eval()
        self.rotator = KeyRotator.from_model(weights)
        self.device = weights.device
        config = weights.config.get_text_config(decoder=True)
        self.config = config
        self.max_length: int = config.max_position_embeddings
        self.vocab_size: int = weights.get_output_embeddings().out_features  # also on quantized heads
        self._identity: dict[str, Any] | None = None

    def new_runner(self, capacity: int) -> TorchRunner:
        # A DynamicCache grows as needed: the capacity is the cache's to enforce.
        return TorchRunner(self)

    def eos_token_ids(self) -> set[int]:
        """The end-of-sequence ids of the model's generation config."""
        eos = self.weights.generation_config.eos_token_id
        return set() if eos is None else set(eos if isinstance(eos, list) else [eos])

    def identity(self) -> dict[str, Any]:
        """The architecture, dtype and a fingerprint of the weights (a sample of every parameter), computed once."""
        if self._identity is None:
            digest = hashlib.sha256()
            with torch.no_grad():
                for name, parameter in self.weights.named_parameters():
                    flat = parameter.detach().reshape(-1)
                    sample = torch.cat((flat[:64], flat[-64:])).float().cpu()
                    digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
                    digest.update(sample.numpy().tobytes())
            self._identity = {
                "backend": self.name,
                "model_type": self.config.model_type,
                "layers": self.config.num_hidden_layers,
                "dtype": str(self.weights.dtype).removeprefix("torch."),
                "weights": digest.hexdigest(),
            }
        return self._identity


class TorchRunner:
    """One conversation on a :class:`TorchBackend` (see :class:`~sirllm_agents.runners.ModelRunner`)."""

    def __init__(self, backend: TorchBackend):
        self.backend = backend
        self.kv = DynamicCache()
        self.length = 0  # tokens cached; a forward broken midway can leave the layers longer, until `truncate`
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    @torch.no_grad()
    def ingest(self, ids: Sequence[int]) -> torch.Tensor:
        device = self.backend.device
        input_ids = torch.tensor([list(ids)], device=device)
        index = torch.arange(self.length, self.length + len(ids), device=device)
        out = self.backend.weights(
            input_ids=input_ids, position_ids=index[None], past_key_values=self.kv, use_cache=True
        )
        logits = out.logits[0].float()
        scores = torch.empty(len(ids), dtype=torch.float32, device=logits.device)
        if len(ids) > 1:
            scores[1:] = surprisal(logits[:-1], input_ids[0, 1:])
        scores[0] = torch.inf if self.logits is None else surprisal(self.logits[None], input_ids[0, :1])[0]
        self.length += len(ids)
        self.logits = logits[-1]
        return scores.cpu()

    def retain(self, keep: torch.Tensor) -> None:
        delta = torch.arange(keep.numel()) - keep
        moved = delta != 0
        new_layers = []
        for i, layer in enumerate(self.kv.layers):
            index = keep.to(layer.keys.device)
            keys, values = layer.keys[:, :, index], layer.values[:, :, index]
            if moved.any():
                keys[:, :, moved] = self.backend.rotator.rotate(keys[:, :, moved], delta[moved], layer=i)
            new_layers.append((keys, values))
        # Swap all layers only once every new tensor exists, so an interrupt cannot leave the layers disagreeing.
        for layer, (keys, values) in zip(self.kv.layers, new_layers):
            layer.keys, layer.values = keys, values
        self.length = keep.numel()

    def truncate(self, length: int) -> None:
        for layer in self._filled_layers():
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        self.length = length
        self.logits = None

    def copy(self) -> TorchRunner:
        twin = TorchRunner(self.backend)
        twin.load_state({name: tensor.clone() for name, tensor in self.state().items()})
        return twin

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, layer in enumerate(self._filled_layers()):
            tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"] = layer.keys, layer.values
        if self.logits is not None:
            tensors["logits"] = self.logits
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.backend.device
        self.kv = DynamicCache()
        layer = 0
        while f"kv.{layer}.keys" in tensors:
            self.kv.update(tensors[f"kv.{layer}.keys"].to(device), tensors[f"kv.{layer}.values"].to(device), layer)
            layer += 1
        self.length = tensors["kv.0.keys"].shape[2] if layer else 0
        self.logits = tensors["logits"].to(device) if "logits" in tensors else None

    def _filled_layers(self) -> list:
        return [layer for layer in self.kv.layers if layer.keys is not None and layer.keys.numel()]
