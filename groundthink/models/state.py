"""LMState: the carried state of a whole model — one dict of branch states per layer plus the stream position.

layers[i] maps a branch name of block i ("rwkv", "mamba", "attention", "ffn") to that mixer's state dict, e.g.
layers[3]["rwkv"] = {"wkv": [B,H,K,V], "shift": [B,D]}. `position` counts the tokens seen since the stream
started; StateNorm uses it to normalise at the same absolute positions whatever the segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LMState:
    layers: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    position: int = 0

    @property
    def batch_size(self) -> int:
        for tensor in self.tensors():
            return tensor.shape[0]
        raise ValueError("this LMState holds no tensors, so it has no batch size")

    def tensors(self):
        for branches in self.layers:
            for state in branches.values():
                yield from state.values()

    def map(self, fn) -> LMState:
        layers = [
            {name: {k: fn(t) for k, t in state.items()} for name, state in branches.items()}
            for branches in self.layers
        ]
        return LMState(layers, self.position)

    def detach(self) -> LMState:
        """The same values cut from the autograd graph (a TBPTT segment boundary)."""
        return self.map(torch.Tensor.detach)

    def to(self, device) -> LMState:
        return self.map(lambda t: t.to(device))

    def num_floats(self) -> int:
        """Elements per batch lane summed over every state tensor (constant for a given model)."""
        return sum(t[0].numel() for t in self.tensors())

    def reset_lanes(self, mask: torch.Tensor, fresh: LMState) -> LMState:
        """Where mask [B] is True take that lane from `fresh` (the h0/zero start state), else keep it.

        The result keeps this state's position: StateNorm positions count from the stream start, shared by
        all lanes.
        """
        if mask.dtype != torch.bool or mask.ndim != 1:
            raise ValueError(
                f"mask must be a 1-D bool tensor [B], got dtype {mask.dtype} shape {tuple(mask.shape)}"
            )
        if len(fresh.layers) != len(self.layers):
            raise ValueError(f"fresh state has {len(fresh.layers)} layers, this one {len(self.layers)}")
        layers = []
        for mine, theirs in zip(self.layers, fresh.layers):
            branches = {}
            for name, state in mine.items():
                branches[name] = {}
                for key, old in state.items():
                    new = theirs[name][key]
                    lane = mask.to(old.device).view(-1, *([1] * (old.ndim - 1)))
                    branches[name][key] = torch.where(lane, new.to(device=old.device, dtype=old.dtype), old)
            layers.append(branches)
        return LMState(layers, self.position)

    def to_flat(self) -> dict[str, torch.Tensor]:
        """{"layers.<i>.<branch>.<key>": tensor}, contiguous, for safetensors."""
        return {
            f"layers.{i}.{name}.{key}": t.detach().contiguous()
            for i, branches in enumerate(self.layers)
            for name, state in branches.items()
            for key, t in state.items()
        }

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor], position: int) -> LMState:
        n_layers = 0
        for key in flat:
            parts = key.split(".")
            if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit():
                raise ValueError(f"state key {key!r} is not of the form 'layers.<i>.<branch>.<name>'")
            n_layers = max(n_layers, int(parts[1]) + 1)
        layers: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(n_layers)]
        for key, tensor in flat.items():
            _, i, name, leaf = key.split(".")
            layers[int(i)].setdefault(name, {})[leaf] = tensor
        return cls(layers, int(position))
