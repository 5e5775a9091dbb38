"""The methods timed side by side: entskip's fused op and its peers (docs/performance.md, "Method").

Every method builds a :class:`Runner` for a case: a closure computing
``y = alpha * (x @ M^T) + r`` (or the plain ``x + r``), and, for a forward+backward
case, the leaves that require grad and the incoming gradient ``g``. Inputs are made
before timing; the closures only compute. A method that cannot run a case raises
:class:`Unsupported`, whose message is reported as the reason for "n/a".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import entskip

from .cases import ALPHA, Case, Workloads


class Unsupported(Exception):
    """A method does not support a case (dtype, device, autograd); the message says why."""


@dataclass
class Runner:
    """What one timed call runs: ``forward()``, then ``y.backward(grad)`` when ``grad`` is set,
    both on the entskip ``backend`` when one is named."""

    forward: Callable[[], Tensor]
    leaves: tuple[Tensor, ...] = ()
    grad: Tensor | None = None
    backend: str | None = None

    def reset(self) -> None:
        """Drop the leaves' gradients (outside the timed region), so no call accumulates into them."""
        for t in self.leaves:
            t.grad = None

    def step(self) -> Tensor:
        """One timed call; returns ``y`` so that freeing it can happen after the clock stops."""
        with entskip.use_backend(self.backend) if self.backend else contextlib.nullcontext():
            y = self.forward()
            if self.grad is not None:
                y.backward(self.grad)
        return y


@dataclass(frozen=True)
class Method:
    """A timed method. ``role``: ``entskip``, ``peer`` (computes the same ``y``) or ``floor`` (``x + r``).

    ``sparse``: its time depends on the mapping's layout; a method without it is
    timed once per ``(N, D, dtype, pass)`` and its number shared by every block and
    density of that group (a dense GEMM does not get faster on zeros).
    ``full_only``: it runs at density 1 only.
    """

    id: str
    label: str
    role: str
    sparse: bool
    build: Callable[[Case, Workloads], Runner]
    note: str
    full_only: bool = False

    def applies(self, case: Case) -> bool:
        return case.density == 1 or not self.full_only


def _runner(case: Case, w: Workloads, compute: Callable[..., Tensor], *tensors: Tensor) -> Runner:
    """A runner calling ``compute(*tensors)``; for fwd+bwd the tensors are leaves requiring grad.

    The leaves are new tensor objects sharing the inputs' storage: nothing is copied.
    """
    if not case.backward:
        return Runner(lambda: compute(*tensors))
    leaves = tuple(t.detach().requires_grad_() for t in tensors)
    return Runner(lambda: compute(*leaves), leaves, w.inputs(case).g)


def reference_expression(x: Tensor, m: Tensor, r: Tensor, alpha: Tensor) -> Tensor:
    """The unfused skip-add, ``alpha * (x @ M^T) + r``, as eager PyTorch writes it."""
    return alpha * (x @ m.T) + r


def _entskip(mapping_of: Callable[[Workloads, Case], entskip.mappings.Mapping], tensor_name: str):
    """Build ``entskip.skip_add`` with the mapping ``mapping_of`` gives; ``tensor_name`` is its trainable tensor."""

    def build(case: Case, w: Workloads) -> Runner:
        entskip.backends.resolve(w.device)  # raises when the selected backend cannot run here
        inp = w.inputs(case)
        mapping = mapping_of(w, case)
        if case.backward:  # a private copy whose tensor requires grad, like a learnable mapping's
            mapping = copy.deepcopy(mapping)
            getattr(mapping, tensor_name).requires_grad_()
        runner = _runner(case, w, lambda x, r, alpha: entskip.skip_add(x, mapping, r, alpha), inp.x, inp.r, inp.alpha)
        if case.backward:
            runner.leaves += (getattr(mapping, tensor_name),)
        return runner

    return build


def _dense_matrix(case: Case, w: Workloads) -> Tensor:
    """The case's mapping as a dense ``D x D`` matrix (what the dense peers multiply by)."""
    return w.sparse(case).matrix().contiguous()


def _eager(case: Case, w: Workloads) -> Runner:
    inp = w.inputs(case)
    return _runner(case, w, reference_expression, inp.x, _dense_matrix(case, w), inp.r, inp.alpha)


def _addmm(case: Case, w: Workloads) -> Runner:
    inp = w.inputs(case)
    return _runner(case, w, lambda x, m, r: torch.addmm(r, x, m.T, beta=1, alpha=ALPHA), inp.x, _dense_matrix(case, w), inp.r)


def _torch_sparse_bsr(case: Case, w: Workloads) -> Runner:
    if case.backward:
        raise Unsupported("no autograd")
    inp = w.inputs(case)
    mapping = w.sparse(case)
    with warnings.catch_warnings():  # "BSR support is in beta", "invariant checks are disabled"
        warnings.simplefilter("ignore", UserWarning)
        bsr = torch.sparse_bsr_tensor(mapping.crow_indices, mapping.col_indices, mapping.blocks, (case.d, case.d))
    xt, rt = inp.x.T, inp.r.T
    return Runner(lambda: torch.addmm(rt, bsr, xt, alpha=ALPHA).T)


def _torch_compile(case: Case, w: Workloads) -> Runner:
    inp = w.inputs(case)
    compiled = torch.compile(reference_expression, dynamic=False, fullgraph=True)
    return _runner(case, w, compiled, inp.x, _dense_matrix(case, w), inp.r, inp.alpha)


def _add(case: Case, w: Workloads) -> Runner:
    inp = w.inputs(case)
    return _runner(case, w, operator.add, inp.x, inp.r)


METHODS: tuple[Method, ...] = (
    Method(
        "entskip-bsr", "entskip bsr", "entskip", True,
        _entskip(Workloads.sparse, "blocks"),
        "entskip.skip_add(x, mappings.sparse(D, density, block, seed=0), r, alpha) on the selected backend",
    ),
    Method(
        "entskip-dense", "entskip dense", "entskip", False,
        _entskip(Workloads.orthogonal, "weight"),
        "entskip.skip_add(x, mappings.orthogonal(D), r, alpha): the dense path, density 1 only",
        full_only=True,
    ),
    Method(
        "eager", "eager", "peer", False, _eager,
        "alpha * (x @ M.T) + r with M = mapping.matrix() dense, alpha a 0-d tensor",
    ),
    Method(
        "addmm", "torch.addmm", "peer", False, _addmm,
        "torch.addmm(r, x, M.T, beta=1, alpha=a): one out-of-place call; alpha a Python number (no dalpha)",
    ),
    Method(
        "sparse-bsr", "torch.sparse bsr", "peer", True, _torch_sparse_bsr,
        "torch.addmm(r.T, M_bsr, x.T, alpha=a).T (y^T = r^T + a M x^T, BSR on the left); no autograd",
    ),
    Method(
        "compile", "torch.compile", "peer", False, _torch_compile,
        "torch.compile(dynamic=False, fullgraph=True) of alpha * (x @ M.T) + r, one graph per shape; compile time excluded",
    ),
    Method("x+r", "x + r", "floor", False, _add, "the plain residual: the floor of a memory-bound op"),
)
METHOD_IDS = tuple(m.id for m in METHODS)


def on_backends(methods: Sequence[Method], backends: Sequence[str]) -> tuple[Method, ...]:
    """``methods`` with each entskip method run on the given entskip backends, side by side:
    one method per backend (id ``entskip-bsr@triton``, label ``entskip bsr [triton]``), or the
    plain id and label when there is one backend."""
    out = []
    for method in methods:
        if method.role != "entskip":
            out.append(method)
            continue
        for backend in backends:
            named = {} if len(backends) == 1 else {"id": f"{method.id}@{backend}", "label": f"{method.label} [{backend}]"}
            out.append(dataclasses.replace(method, build=_on_backend(method.build, backend), **named))
    return tuple(out)


def _on_backend(build: Callable[[Case, Workloads], Runner], backend: str) -> Callable[[Case, Workloads], Runner]:
    def on_backend(case: Case, w: Workloads) -> Runner:
        with entskip.use_backend(backend):
            runner = build(case, w)
        runner.backend = backend
        return runner

    return on_backend


def select(ids) -> tuple[Method, ...]:
    """The methods named by ``ids``, in table order; ``x + r`` is always included (the ratios use it)."""
    unknown = set(ids) - set(METHOD_IDS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHOD_IDS}")
    return tuple(m for m in METHODS if m.id in ids or m.role == "floor")


def compile_limits():
    """A context raising dynamo's recompile limits: the grid compiles one graph per shape, dtype and pass.

    (The limits were called ``cache_size_limit`` and ``accumulated_cache_size_limit`` before torch 2.6.)
    """
    config = torch._dynamo.config
    pairs = (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit", "accumulated_cache_size_limit"))
    names = [next(n for n in pair if hasattr(config, n)) for pair in pairs if any(hasattr(config, n) for n in pair)]
    return config.patch({name: 4096 for name in names})
