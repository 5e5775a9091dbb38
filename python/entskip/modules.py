"""Drop-in ``nn.Module``s for entangled residual skips.

- :class:`EntangledSkip`: ``forward(x, branch_out) = alpha * (x @ M^T) + branch_out``;
  replaces the ``x + f(x)`` of an existing block.
- :class:`EntangledResidual`: wraps a branch ``f`` and computes
  ``alpha * (x @ M^T) + f(x)``.

Both take ``(..., D)`` activations, or ``(N, C, H, W)`` ones in either memory format
(returned in the format given).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import mappings as _mappings
from .ops import skip_add


class EntangledSkip(nn.Module):
    """``y = alpha * (x @ M^T) + branch_out``.

    Args:
        dim: number of input features ``D_in`` (channels for 4-D inputs).
        mapping: a name from :data:`entskip.mappings.MAPPINGS` (built with
            ``mapping_kwargs``) or a :class:`entskip.mappings.Mapping` instance.
        alpha: the skip weight (a depth schedule gives one per block).
        learnable_alpha: make ``alpha`` a parameter instead of a buffer.

    ``alpha`` is stored with shape ``(1,)`` (FSDP2's ``fully_shard`` rejects 0-d
    parameters) and reaches the op as a 0-d view; checkpoints with a 0-d ``alpha``
    (saved before) load.
        feature_dim: the features' dimension of the input; ``None`` means the last one,
            except for 4-D inputs whose dim 1 (and not the last) has ``dim`` entries,
            which are treated as ``(N, C, H, W)``.
        device, dtype: where to create the mapping and ``alpha``.
        **mapping_kwargs: passed to the mapping constructor (``block``, ``density``,
            ``seed``, ...).

    Shapes: ``x`` ``(..., D_in)`` or ``(N, D_in, H, W)``; ``branch_out`` the output's shape
    or ``None``; output with ``D_out`` features, ``x``'s dtype and memory format.
    """

    def __init__(
        self,
        dim: int,
        mapping: str | _mappings.Mapping = "identity",
        alpha: float = 1.0,
        *,
        learnable_alpha: bool = False,
        feature_dim: int | None = None,
        device=None,
        dtype=None,
        **mapping_kwargs,
    ):
        super().__init__()
        if isinstance(mapping, str):
            mapping = _mappings.make(mapping, dim, **mapping_kwargs)
        elif not isinstance(mapping, _mappings.Mapping):
            raise TypeError(f"mapping must be a mapping name or an entskip Mapping, got {type(mapping).__name__}")
        elif mapping_kwargs:
            raise TypeError(f"mapping keywords {sorted(mapping_kwargs)} given with a ready-made mapping")
        if mapping.in_features != dim:
            raise ValueError(f"mapping has {mapping.in_features} input features but dim is {dim}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.dim = dim
        self.feature_dim = feature_dim
        self.mapping = mapping
        alpha_t = torch.tensor([float(alpha)], dtype=torch.float32)
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha_t)
        else:
            self.register_buffer("alpha", alpha_t)
        self.to(device=device, dtype=dtype)

    def _feature_dim(self, x: Tensor) -> int:
        if self.feature_dim is not None:
            return self.feature_dim
        if x.dim() == 4 and x.shape[1] == self.dim and x.shape[-1] != self.dim:
            return 1
        return -1

    def forward(self, x: Tensor, branch_out: Tensor | None = None) -> Tensor:
        # alpha[0]: the 0-d view by the indexing fast path (a microsecond or two less than view(()))
        return skip_add(x, self.mapping, branch_out, self.alpha[0], feature_dim=self._feature_dim(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        alpha = state_dict.get(prefix + "alpha")
        if isinstance(alpha, Tensor) and alpha.dim() == 0:  # a checkpoint from before alpha had shape (1,)
            state_dict[prefix + "alpha"] = alpha.reshape(1)  # load_state_dict passes its own copy of the dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        learn = ", learnable_alpha=True" if isinstance(self.alpha, nn.Parameter) else ""
        alpha = self.alpha.detach()
        value = "?" if alpha.device.type == "meta" else f"{float(alpha):.4g}"
        return f"dim={self.dim}, kind={self.mapping.kind}, alpha={value}{learn}"


class EntangledResidual(nn.Module):
    """``y = alpha * (x @ M^T) + branch(x)``: a residual block with an entangled skip.

    Args:
        branch: the residual branch ``f``; its output must have ``x``'s shape with
            ``D_out`` features.
        dim, mapping, alpha, ...: as for :class:`EntangledSkip`.
    """

    def __init__(self, branch: nn.Module, dim: int, mapping: str | _mappings.Mapping = "identity", alpha: float = 1.0, **kwargs):
        super().__init__()
        self.branch = branch
        self.skip = EntangledSkip(dim, mapping, alpha, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x, self.branch(x))
