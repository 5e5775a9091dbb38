"""Small reference models whose residual adds go through :class:`entskip.EntangledSkip`.

Each block computes its residual as ``self.<skip>(x, branch_out)`` with an identity skip
(``alpha = 1``, ``M = I``) by default, so an unconverted model is the ordinary residual
network and :func:`entskip.entangle` swaps in entangled skips without touching
``forward``. They are sized for CPU tests and the papers' small-scale reproductions:

- :class:`ResNet`: CIFAR-style ResNet (``depth = 6n + 2``) of :class:`BasicBlock`\\ s.
- :class:`ViT`: a pre-norm Vision Transformer of :class:`Block`\\ s, two residuals each.
- :class:`ResidualRNN`: a stack of :class:`ResidualRNNCell`\\ s, ``h_{t+1} = skip(h_t, f(h_t, x_t))``.
"""

from .resnet import BasicBlock, ResNet
from .rnn import ResidualRNN, ResidualRNNCell
from .vit import Attention, Block, Mlp, ViT

__all__ = ["Attention", "BasicBlock", "Block", "Mlp", "ResNet", "ResidualRNN", "ResidualRNNCell", "ViT"]
