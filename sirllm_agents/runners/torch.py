"""The PyTorch backend: a transformers causal LM, its KV cache as a ``DynamicCache``, keys re-rotated in PyTorch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .base import batch_inputs, surprisal
from .rope import KeyRotator


class TorchBackend:
    """A loaded transformers model (any device and dtype) serving any number of :class:`TorchRunner`."""

    name = "torch"
    step_tokens = None  # a scheduler's step runs a prompt chunk whole, as ``ingest`` does
    can_batch = True

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

    def batch_key(self, runner: TorchRunner, tokens: int) -> str | int:
        """Decode steps (one token each) run together; a longer input runs alone, since a padded batch would cost
        every row its length."""
        return "decode" if tokens == 1 else id(runner)

    def decode_together(self, runners: Sequence[TorchRunner], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """:func:`decode_together` on runners of these weights."""
        return decode_together(runners, tokens)

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


@torch.no_grad()
def decode_together(runners: Sequence[TorchRunner], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Append ``tokens[i]`` to ``runners[i]``'s cache for every ``i`` in one forward of the batch, and return each
    runner's surprisals, as :meth:`TorchRunner.ingest` gives them up to float rounding (the padded attention sums in
    another order).

    Row ``b`` of the batch is runner ``b``'s conversation alone: its cache, zero-padded after its own tokens to the
    longest cache, then its new tokens at its own next positions, zero-padded to the longest input with queries
    nobody reads. A mask hides the padding. Runners change only once the forward has succeeded, and an input error
    names the runner."""
    names = [f"runner {n}" for n in range(len(runners))]
    ids = batch_inputs(runners, tokens, runners[0].backend.vocab_size if runners else 0, names)
    for runner, name in zip(runners, names):
        if runner.backend is not runners[0].backend:
            raise ValueError(f"{name} runs other weights than runner 0: one model decodes at once")
    scores = [torch.empty(0) for _ in ids]
    rows = [n for n, chunk in enumerate(ids) if chunk]
    if not rows:
        return scores
    batch, inputs = [runners[n] for n in rows], [ids[n] for n in rows]
    backend = batch[0].backend
    past, new = max(runner.length for runner in batch), max(len(chunk) for chunk in inputs)
    stacked = _stacked_cache(batch, past)
    out = backend.weights(
        input_ids=torch.tensor([chunk + [0] * (new - len(chunk)) for chunk in inputs], device=backend.device),
        position_ids=torch.stack([torch.arange(r.length, r.length + new, device=backend.device) for r in batch]),
        attention_mask=_padding_mask(batch, past, new, backend.weights.dtype, backend.device),
        past_key_values=stacked,
        use_cache=True,
    )
    logits = out.logits.float()
    updates = []
    for b, (runner, chunk) in enumerate(zip(batch, inputs)):
        own = runner._filled_layers()
        layers = []
        for layer, joint in enumerate(stacked.layers):
            keys = joint.keys[b : b + 1, :, past : past + len(chunk)]
            values = joint.values[b : b + 1, :, past : past + len(chunk)]
            if own:
                keys = torch.cat((own[layer].keys[:, :, : runner.length], keys), dim=2)
                values = torch.cat((own[layer].values[:, :, : runner.length], values), dim=2)
            layers.append((keys, values))
        target = torch.tensor(chunk, device=logits.device)
        chunk_scores = torch.empty(len(chunk), dtype=torch.float32, device=logits.device)
        chunk_scores[1:] = surprisal(logits[b, : len(chunk) - 1], target[1:])
        chunk_scores[0] = torch.inf if runner.logits is None else surprisal(runner.logits[None], target[:1])[0]
        updates.append((layers, logits[b, len(chunk) - 1], chunk_scores.cpu()))
    for n, runner, (layers, last, chunk_scores) in zip(rows, batch, updates):
        runner.kv = DynamicCache()
        for layer, (keys, values) in enumerate(layers):
            runner.kv.update(keys, values, layer)
        runner.length += len(ids[n])
        runner.logits = last
        scores[n] = chunk_scores
    return scores


def _padding_mask(
    runners: Sequence[TorchRunner], past: int, new: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The additive attention mask [batch, 1, new, past + new]: row ``b``'s queries see runner ``b``'s own cached
    tokens and, causally, its new ones; never the padding (every query sees itself, so no row is all hidden)."""
    visible = torch.zeros(len(runners), new, past + new, dtype=torch.bool, device=device)
    visible[:, :, past:] = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    for b, runner in enumerate(runners):
        visible[b, :, : runner.length] = True
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _stacked_cache(runners: Sequence[TorchRunner], length: int) -> DynamicCache:
    """The runners' caches as one batch: row ``b`` holds runner ``b``'s keys and values, zeros past its own length
    up to ``length``."""
    stacked = DynamicCache()
    filled = [runner._filled_layers() for runner in runners]
    layers = next((own for own in filled if own), [])
    for layer, example in enumerate(layers):
        keys = example.keys.new_zeros(len(runners), example.keys.shape[1], length, example.keys.shape[3])
        values = example.values.new_zeros(len(runners), example.values.shape[1], length, example.values.shape[3])
        for b, (runner, own) in enumerate(zip(runners, filled)):
            if own:
                keys[b, :, : runner.length] = own[layer].keys[0, :, : runner.length]
                values[b, :, : runner.length] = own[layer].values[0, :, : runner.length]
        stacked.update(keys, values, layer)
    return stacked
