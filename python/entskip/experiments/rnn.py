"""``rnn``: a residual RNN with identity vs orthogonal recurrent skips on two generated tasks.

Lechner et al. (2022) report that in recurrent networks orthogonal residual mappings
form an inductive bias for time-variant sequences, which degrades accuracy on
time-invariant tasks. The recurrence here is :class:`entskip.models.ResidualRNNCell`,
``h_{t+1} = alpha * (h_t @ M^T) + W_o tanh(W_x x_t + W_h h_t + b) + b_o`` with
``alpha = 1`` and ``M`` the identity or a frozen Haar orthogonal matrix. With
``M = I`` the state sums the branch's outputs over time regardless of when they came;
with an orthogonal ``M`` the contribution of step ``t`` reaches the end rotated by
``M^(T - t)``, which tells the steps apart.

Both tasks are generated (entskip's own construction: the paper's data sets are not
used) over the same inputs, one-hot symbols from an alphabet of ``K = 8``, ``T = 24``
steps, labels in ``0..K-1``:

- ``time_variant``: symbols uniform and independent; the label is the symbol at step
  ``T / 4``, so *when* a symbol came decides the answer (chance: 1/8).
- ``time_invariant``: a class ``c`` is drawn and each symbol is ``c`` with probability
  0.3, any other with 0.1; the label is the most frequent symbol (ties to the lowest),
  which no reordering of the steps changes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from entskip.models import ResidualRNN

from . import compare
from .common import Optim, Settings, verdict

EPOCHS = 25
SEEDS = 5
LENGTH = 24
SYMBOLS = 8
TRAIN, TEST = 4000, 1000
CLAIM = (
    "RNNs: orthogonal residual mappings are an inductive bias for time-variant sequences "
    "and degrade accuracy on time-invariant tasks"
)


def sequences(task: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences of the task ``"time_variant"`` or ``"time_invariant"`` (module docstring).

    Returns:
        ``x (n, LENGTH, SYMBOLS)`` one-hot float32 and ``y (n,)`` int64 labels.
    """
    if task == "time_variant":
        symbols = torch.randint(SYMBOLS, (n, LENGTH), generator=generator)
        labels = symbols[:, LENGTH // 4]
    elif task == "time_invariant":
        cls = torch.randint(SYMBOLS, (n,), generator=generator)
        probs = torch.full((n, SYMBOLS), 0.1).scatter_(1, cls[:, None], 0.3)
        symbols = torch.multinomial(probs, LENGTH, replacement=True, generator=generator)
        counts = torch.nn.functional.one_hot(symbols, SYMBOLS).sum(dim=1)
        labels = counts.argmax(dim=1)  # first maximum: ties go to the lowest symbol
    else:
        raise ValueError(f"unknown task {task!r}")
    return torch.nn.functional.one_hot(symbols, SYMBOLS).float(), labels


def task_data(task: str, seed: int) -> dict[str, Tensor]:
    """Training and test sets of ``task`` drawn from ``seed`` (``TRAIN`` and ``TEST`` sequences)."""
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = sequences(task, TRAIN, generator)
    x_test, y_test = sequences(task, TEST, generator)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def setup(task: str) -> compare.Setup:
    """The identity-vs-orthogonal comparison on one task."""
    return compare.Setup(
        build=partial(ResidualRNN, input_size=SYMBOLS, hidden_size=64, num_layers=1, num_classes=SYMBOLS),
        data=partial(task_data, task),
        mappings={"identity": {}, "orthogonal": {}},
        optim=Optim(lr=3e-3, weight_decay=0.0, batch_size=128, clip_grad=1.0),
        describe={
            "model": f"ResidualRNN(input_size={SYMBOLS}, hidden_size=64, num_layers=1)",
            "data": f"generated {task}: T={LENGTH}, K={SYMBOLS}, {TRAIN} train / {TEST} test sequences",
        },
    )


def run(settings: Settings) -> dict:
    """Train both recurrent skips on both tasks for every seed; returns the :func:`compare.run`
    result and the verdicts (orthogonal - identity: expected > 0 on the time-variant task,
    < 0 on the time-invariant one, judged by the paired 95 % t-interval over seeds)."""
    setups = {task: setup(task) for task in ("time_variant", "time_invariant")}
    result = compare.run(setups, settings, EPOCHS, SEEDS, "rnn")
    verdicts = []
    for task, sign in (("time_variant", +1), ("time_invariant", -1)):
        delta = result["results"][task]["orthogonal"]["delta_vs_identity"]
        verdicts.append({"setup": task, "mapping": "orthogonal", "expected_sign": sign, "mean": delta["mean"],
                         "ci95": delta["ci95"], "verdict": verdict(delta["ci95"], sign)})
    return {"claim": CLAIM, **result, "verdicts": verdicts}


plot = compare.plot
