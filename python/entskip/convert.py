"""``entangle(model)``: replace the identity skips of known residual blocks in place.

A residual block computes ``y = x + f(x)``; after conversion it computes

    y = alpha_l * (x @ M_l^T) + f(x)

through an :class:`entskip.EntangledSkip` per skip, with ``M_l`` a mapping of the
chosen kind (seeded per skip) and ``alpha_l`` the skip's value from a depth schedule
(docs/design.md, "Schedules"). What a block type looks like is told by a :class:`BlockAdapter`
in a registry keyed by the block's class:

- entskip's own models (:mod:`entskip.models`): ResNet ``BasicBlock``, ViT ``Block``
  (two skips: attention and MLP), ``ResidualRNNCell``;
- timm's ``VisionTransformer`` ``Block`` (two skips: attention and MLP);
- torchvision's ResNet ``BasicBlock`` and ``Bottleneck`` (identity shortcuts only;
  blocks with a ``downsample`` projection keep it and stay as they are).

timm and torchvision are optional: their entries are keyed by qualified class name,
so nothing of theirs is imported, by entskip or by the adapters. Register an adapter
for another block type with :func:`register_adapter`.

Third-party blocks are converted by giving the instance a subclass of its class whose
``forward`` calls the skips (:func:`patch_forward`; ``isinstance`` still holds). Save
and load converted models through ``state_dict``: pickling a whole patched module is
not supported.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import mappings as _mappings
from . import schedules
from .models import resnet as _resnet
from .models import rnn as _rnn
from .models import vit as _vit
from .modules import EntangledSkip

__all__ = [
    "BlockAdapter",
    "SkipSpec",
    "count_skips",
    "entangle",
    "patch_forward",
    "register_adapter",
    "supported_blocks",
]

# entskip's heuristic, not a threshold from Zhang et al. (their released MAE code zero-initialises the
# branch output projections in every run, baseline and decayed alike): warn below this alpha without zero-init.
_ZERO_INIT_ALPHA = 0.7


class SkipSpec(NamedTuple):
    """One identity skip of a block, as an adapter describes it.

    Attributes:
        attr: name of the block attribute that holds the skip; the block's forward
            computes ``self.<attr>(x, branch_out)``.
        dim: features of ``x`` at the skip (channels for convolutional blocks).
        feature_dim: the dimension of ``x`` that holds them: ``-1`` for ``(..., D)``
            tokens, ``1`` for ``(N, C, H, W)`` feature maps.
        branch_output: the branch's last layer with a ``weight`` (a Linear, a
            convolution, a norm), zeroed by ``entangle(..., zero_init_branch=True)``;
            ``None`` if the block has none.
    """

    attr: str
    dim: int
    feature_dim: int = -1
    branch_output: nn.Module | None = None


@dataclass(frozen=True)
class BlockAdapter:
    """How :func:`entangle` converts one block type.

    Attributes:
        skips: ``skips(block) -> [SkipSpec, ...]``: the block's identity skips in
            forward order; an empty list when it has none to convert (a projection
            shortcut, for example).
        forward: ``None`` when the block's forward already calls
            ``self.<attr>(x, branch_out)`` for each skip; otherwise a replacement
            ``forward(self, *args, **kwargs)`` that does, installed on each converted
            block with :func:`patch_forward`.
    """

    skips: Callable[[nn.Module], Sequence[SkipSpec]]
    forward: Callable | None = None


_ADAPTERS: dict[type | str, BlockAdapter] = {}
_PATCHED: dict[tuple[type, Callable], type] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(block_type: type | str, adapter: BlockAdapter) -> None:
    """Teach :func:`entangle` a block type (replacing an earlier adapter for it).

    Args:
        block_type: the block's class, or its qualified name
            ``"package.module.ClassName"`` (matches without importing the package).
            Only instances of exactly this class match, not of its subclasses, whose
            forward may differ.
        adapter: a :class:`BlockAdapter`.
    """
    if not isinstance(block_type, (type, str)):
        raise TypeError(f"block_type must be a class or a qualified class name, got {type(block_type).__name__}")
    if isinstance(block_type, type) and not issubclass(block_type, nn.Module):
        raise TypeError(f"block_type must be an nn.Module subclass, got {block_type.__name__}")
    if not isinstance(adapter, BlockAdapter):
        raise TypeError(f"adapter must be an entskip.BlockAdapter, got {type(adapter).__name__}")
    _ADAPTERS[block_type] = adapter


def supported_blocks() -> list[str]:
    """Qualified names of the block types :func:`entangle` converts, sorted."""
    return sorted(key if isinstance(key, str) else _qualified_name(key) for key in _ADAPTERS)


def patch_forward(block: nn.Module, forward: Callable) -> None:
    """Make ``block`` run ``forward(block, ...)`` by moving it to a subclass of its class.

    The subclass (``Entangled<Class>``, one per class and forward) overrides only
    ``forward``, so parameters, hooks, ``state_dict`` keys and ``isinstance`` checks
    are unchanged. Patching an already patched block swaps in the new forward.
    """
    base = getattr(type(block), "_entskip_base", type(block))
    cls = _PATCHED.get((base, forward))
    if cls is None:
        cls = type(f"Entangled{base.__name__}", (base,), {"forward": forward, "_entskip_base": base})
        _PATCHED[(base, forward)] = cls
    block.__class__ = cls


def _adapter_for(module: nn.Module) -> BlockAdapter | None:
    cls = getattr(type(module), "_entskip_base", type(module))
    return _ADAPTERS.get(cls) or _ADAPTERS.get(_qualified_name(cls))


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockAdapter, list[SkipSpec]]]:
    """Known blocks in module registration order (the forward order of sequential stacks).

    A known block's children are not searched; a module reached twice counts once.
    """
    found, seen = [], set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        adapter = _adapter_for(module)
        if adapter is None:
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        specs = list(adapter.skips(module))
        for spec in specs:
            if not isinstance(spec, SkipSpec):
                raise TypeError(f"the adapter of {_qualified_name(type(module))} returned {spec!r}, not a SkipSpec")
        found.append((name, module, adapter, specs))

    visit("", model)
    return found


def count_skips(model: nn.Module) -> int:
    """How many identity skips :func:`entangle` would convert in ``model`` (the length an
    explicit schedule must have)."""
    return sum(len(specs) for *_, specs in _find_blocks(model))


def _no_blocks_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"entangle found no supported residual block in {type(model).__name__}. Supported block types: "
        f"{', '.join(supported_blocks())}. Register an adapter for your own with entskip.register_adapter()."
    )


def _schedule_values(schedule, alpha, alpha_min, skips_per_block: list[int]) -> list[float]:
    """One ``alpha`` per skip, in forward order (see :func:`entangle`)."""
    total = sum(skips_per_block)
    is_name = isinstance(schedule, str)
    if alpha_min is not None and schedule != "decay":
        raise ValueError(f"alpha_min is used only by schedule='decay', got schedule={schedule!r}")
    if alpha is not None and schedule != "constant":
        raise ValueError(f"alpha is used only by schedule='constant', got schedule={schedule!r}")
    if is_name and schedule == "decay":
        alpha_min = 0.8 if alpha_min is None else alpha_min
        two_per_block = all(n == 2 for n in skips_per_block if n)
        if two_per_block:
            return schedules.decayed(total // 2, alpha_min, per_sublayer=True)
        return schedules.decayed(total, alpha_min)
    if is_name and schedule == "constant":
        return schedules.constant(total, 1.0 if alpha is None else alpha)
    if is_name or not isinstance(schedule, Sequence):
        raise ValueError(f"schedule must be 'decay', 'constant' or a list of alphas, got {schedule!r}")
    if len(schedule) != total:
        raise ValueError(f"schedule has {len(schedule)} alphas but the model has {total} skips to convert")
    for value in schedule:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"schedule must hold finite numbers, got {value!r}")
    return [float(value) for value in schedule]


def _placement(block: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of the block's first floating parameter or buffer."""
    for t in (*block.parameters(), *block.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _zero_(layer: nn.Module | None, where: str) -> None:
    if layer is None or not isinstance(getattr(layer, "weight", None), Tensor):
        raise ValueError(f"zero_init_branch=True, but {where} names no branch output layer with a weight")
    with torch.no_grad():
        layer.weight.zero_()
        if isinstance(getattr(layer, "bias", None), Tensor):
            layer.bias.zero_()


def entangle(
    model: nn.Module,
    mapping: str = "sparse",
    schedule: str | Sequence[float] = "decay",
    *,
    alpha_min: float | None = None,
    alpha: float | None = None,
    zero_init_branch: bool = False,
    learnable_alpha: bool = False,
    **mapping_kwargs,
) -> nn.Module:
    """Replace the identity skips of the known residual blocks of ``model``, in place.

    Each skip ``x + f(x)`` of a block listed by :func:`supported_blocks` becomes
    ``alpha_l * (x @ M_l^T) + f(x)``, an :class:`entskip.EntangledSkip` stored as a
    block attribute (so it moves with ``.to()`` and lives in ``state_dict``).
    Projection shortcuts are left as they are. Skip ``l`` counts skips in forward
    order over the whole model (module registration order).

    Args:
        model: the network; converted in place and returned.
        mapping: the kind of ``M_l``, a name in :data:`entskip.mappings.MAPPINGS`.
            Kinds that take a ``seed`` get ``seed + l`` (``seed`` from
            ``mapping_kwargs``, default 0), so no two skips share a mapping.
        schedule: the ``alpha_l``:

            - ``"decay"``: :func:`entskip.schedules.decayed` down to ``alpha_min``
              (default 0.8; Zhang et al.'s released MAE script uses 0.7 with
              zero-initialised branches, SiT 0.8). When every converted block has two skips
              (ViT-style attention + MLP), each sub-layer gets its own value
              (``per_sublayer=True``: 1.0 first, ``alpha_min`` last); otherwise
              ``alpha_l = 1 - l (1 - alpha_min) / S`` for ``l = 1..S`` skips.
            - ``"constant"``: ``alpha`` (default 1.0) everywhere.
            - a list of ``S`` numbers, one per skip (:func:`count_skips` gives ``S``).
        alpha_min: the last skip's alpha of ``"decay"`` (only with that schedule).
        alpha: the value of ``"constant"`` (only with that schedule).
        zero_init_branch: zero the weight and bias of each converted block's branch
            output layer, so every branch starts as the zero function (Zhang et al.'s
            released code does this in every run, baseline included; entskip warns
            when it is off and some alpha is at or below 0.7, a heuristic of its own,
            not a threshold from the paper). Do not use it on pretrained weights.
        learnable_alpha: make each ``alpha_l`` a parameter instead of a buffer. The
            parameter is 0-d, which FSDP2's ``fully_shard`` rejects; DDP takes it.
        **mapping_kwargs: passed to the mapping constructor (``density``, ``block``,
            ``learnable``, ``seed``, ...).

    Returns:
        ``model``.

    Raises:
        ValueError: no supported block in ``model`` (the message lists the supported
            types), no identity skip in the blocks found, an unknown ``mapping``, a
            bad ``schedule`` (a list of the wrong length), or a mapping that cannot be
            built for a skip's width (the message names the skip). The model is left
            untouched when building any skip fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mapping, str) or mapping not in _mappings.MAPPINGS:
        raise ValueError(f"mapping must be one of {sorted(_mappings.MAPPINGS)}, got {mapping!r}")
    blocks = _find_blocks(model)
    if not blocks:
        raise _no_blocks_error(model)
    sites = [(name, block, spec) for name, block, _, specs in blocks for spec in specs]
    if not sites:
        raise ValueError(
            f"entangle found {len(blocks)} supported blocks in {type(model).__name__}, but none has an identity "
            "skip to convert (projection shortcuts are left as they are)"
        )
    alphas = _schedule_values(schedule, alpha, alpha_min, [len(specs) for *_, specs in blocks])

    seeded = "seed" in inspect.signature(_mappings.MAPPINGS[mapping]).parameters
    base_seed = mapping_kwargs.get("seed", 0)
    if seeded and (isinstance(base_seed, bool) or not isinstance(base_seed, int)):
        raise TypeError(f"seed must be an int, got {base_seed!r}")
    skips = []
    for index, ((name, block, spec), value) in enumerate(zip(sites, alphas)):
        kwargs = {**mapping_kwargs, "seed": base_seed + index} if seeded else mapping_kwargs
        device, dtype = _placement(block)
        try:
            skips.append(
                EntangledSkip(
                    spec.dim,
                    mapping,
                    value,
                    learnable_alpha=learnable_alpha,
                    feature_dim=spec.feature_dim,
                    device=device,
                    dtype=dtype,
                    **kwargs,
                )
            )
        except (TypeError, ValueError) as err:
            where = f"{name}.{spec.attr}" if name else spec.attr
            raise type(err)(f"cannot build a {mapping!r} skip for '{where}' (dim={spec.dim}): {err}") from err

    for (name, block, spec), skip in zip(sites, skips):
        setattr(block, spec.attr, skip)
        if zero_init_branch:
            _zero_(spec.branch_output, f"the adapter of {type(block).__name__} at '{name}.{spec.attr}'")
    for _, block, adapter, specs in blocks:
        if specs and adapter.forward is not None:
            patch_forward(block, adapter.forward)

    if not zero_init_branch and min(alphas) <= _ZERO_INIT_ALPHA:
        warnings.warn(
            f"entangle: the smallest alpha is {min(alphas):.3g} <= {_ZERO_INIT_ALPHA}; Zhang et al.'s released code "
            "starts the branch output projections at zero (zero_init_branch=True)",
            stacklevel=2,
        )
    return model


# --- entskip's own models ---------------------------------------------------------


def _resnet_skips(last_bn: str) -> Callable[[nn.Module], list[SkipSpec]]:
    """Skips of a ResNet block (entskip's or torchvision's) whose branch ends in the
    batch norm ``last_bn``: one over the channels, none if the block has a
    ``downsample`` projection."""

    def skips(block) -> list[SkipSpec]:
        if block.downsample is not None:
            return []
        bn = getattr(block, last_bn)
        return [SkipSpec("skip", bn.num_features, 1, bn)]

    return skips


def _vit_skips(block) -> list[SkipSpec]:
    """The attention and MLP skips of a pre-norm block with ``attn.proj`` and ``mlp.fc2``."""
    proj, fc2 = getattr(block.attn, "proj", None), getattr(block.mlp, "fc2", None)
    if proj is None or fc2 is None:
        raise ValueError(f"{_qualified_name(type(block))}: expected attn.proj and mlp.fc2 to read the width from")
    return [SkipSpec("skip_attn", proj.out_features, -1, proj), SkipSpec("skip_mlp", fc2.out_features, -1, fc2)]


def _rnn_cell_skips(cell) -> list[SkipSpec]:
    return [SkipSpec("skip", cell.out.out_features, -1, cell.out)]


register_adapter(_resnet.BasicBlock, BlockAdapter(_resnet_skips("bn2")))
register_adapter(_vit.Block, BlockAdapter(_vit_skips))
register_adapter(_rnn.ResidualRNNCell, BlockAdapter(_rnn_cell_skips))


# --- timm -------------------------------------------------------------------------


def _timm_block_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """timm ``Block.forward`` with both ``x + ...`` residual adds through the skips.

    ``attn_kwargs`` (``attn_mask``, ``is_causal`` in recent timm) go to the attention
    as the original forward passes them; older timm passes none.
    """
    x = self.skip_attn(x, self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs))))
    return self.skip_mlp(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


register_adapter("timm.models.vision_transformer.Block", BlockAdapter(_vit_skips, _timm_block_forward))


# --- torchvision ------------------------------------------------------------------


def _torchvision_basic_forward(self, x: Tensor) -> Tensor:
    """torchvision ``BasicBlock.forward`` (no downsample) with ``out += x`` through ``self.skip``."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(self.skip(x, out))


def _torchvision_bottleneck_forward(self, x: Tensor) -> Tensor:
    """torchvision ``Bottleneck.forward`` (no downsample) with ``out += x`` through ``self.skip``."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(self.skip(x, out))


register_adapter(
    "torchvision.models.resnet.BasicBlock", BlockAdapter(_resnet_skips("bn2"), _torchvision_basic_forward)
)
register_adapter(
    "torchvision.models.resnet.Bottleneck", BlockAdapter(_resnet_skips("bn3"), _torchvision_bottleneck_forward)
)
