"""A residual RNN whose recurrence goes through :class:`EntangledSkip`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modules import EntangledSkip


class ResidualRNNCell(nn.Module):
    """``h_{t+1} = skip(h_t, f(h_t, x_t))`` with ``f(h, x) = out(tanh(in_x(x) + in_h(h)))``.

    With an entangled skip this is ``alpha * (h_t @ M^T) + W_o tanh(W_x x_t + W_h h_t + b) + b_o``:
    ``M`` carries the state across time steps (identity, ``alpha = 1`` until
    :func:`entskip.entangle` replaces it) and ``out`` is the branch's output projection.

    Shapes: ``x_t (N, input_size)``, ``h (N, hidden_size)`` -> ``(N, hidden_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.in_x = nn.Linear(input_size, hidden_size)
        self.in_h = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.skip = EntangledSkip(hidden_size)

    def forward(self, x_t: Tensor, h: Tensor) -> Tensor:
        return self.skip(h, self.out(torch.tanh(self.in_x(x_t) + self.in_h(h))))


class ResidualRNN(nn.Module):
    """``num_layers`` stacked :class:`ResidualRNNCell`\\ s and a classifier on the last state.

    Layer ``l`` runs over the hidden sequence of layer ``l - 1`` (the input sequence for
    the first), from ``h_0 = 0``; one skip per layer, applied at every time step.

    Args:
        input_size: features of each input step.
        hidden_size: state width.
        num_layers: stacked cells.
        num_classes: outputs of the classifier.

    Shapes: ``x (N, T, input_size)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, input_size: int, hidden_size: int = 128, num_layers: int = 1, num_classes: int = 10):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(ResidualRNNCell(size, hidden_size) for size in sizes)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.unbind(1)
        for cell in self.cells:
            h = x.new_zeros(x.shape[0], cell.out.out_features)
            states = []
            for x_t in seq:
                h = cell(x_t, h)
                states.append(h)
            seq = states
        return self.head(seq[-1])
