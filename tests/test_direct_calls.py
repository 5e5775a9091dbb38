"""The direct calls of the elementwise ops (``entskip._C.identity_skip_add`` /
``permutation_skip_add`` / ``plain_skip_add``, ``direct_calls.py``): eager ``skip_add`` on
plain tensors takes them, they are the op (same results, autograd, dispatch modes see the
op), and everything they cannot serve (tensor subclasses, torch function modes,
``torch.compile``, anything ``plain_skip_add`` declines) goes through ``torch.ops``. Also
the permutation mapping's own record of the index that passed its check.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import entskip
from entskip import _C, direct_calls, gpu_dispatch, mappings, reference, versions

from conftest import OpLog, assert_close

KINDS = ["identity", "permutation"]


class _CountingC:
    """Stands in for ``entskip._C`` in ``direct_calls``: counts the direct calls it forwards
    (``plain_skip_add`` ones where they ran an op)."""

    def __init__(self):
        self.calls = []

    def identity_skip_add(self, *args):
        self.calls.append("identity")
        return _C.identity_skip_add(*args)

    def permutation_skip_add(self, *args):
        self.calls.append("permutation")
        return _C.permutation_skip_add(*args)

    def plain_skip_add(self, x, index, *args):
        y = _C.plain_skip_add(x, index, *args)
        if y is not None:
            self.calls.append("identity" if index is None else "permutation")
        return y


@pytest.fixture
def counting(monkeypatch):
    c = _CountingC()
    monkeypatch.setattr(direct_calls, "_C", c)
    return c


def _case(kind, dtype=torch.float64, shape=(3, 5, 24), grad=True):
    gen = torch.Generator().manual_seed(7)
    x, branch = (torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad) for _ in range(2))
    alpha = torch.tensor(0.6, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=grad)
    mapping = None if kind == "identity" else mappings.permutation(shape[-1], seed=3)
    return x, branch, alpha, mapping


def _expected(kind, x, branch, alpha, mapping):
    if kind == "identity":
        return reference.identity_skip_add(x, branch, alpha)
    return reference.permutation_skip_add(x, mapping.index, branch, alpha)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_branch", [True, False])
def test_eager_skip_add_takes_the_direct_call_and_matches_the_reference(counting, kind, with_branch):
    x, branch, alpha, mapping = _case(kind)
    branch = branch if with_branch else None
    y = entskip.skip_add(x, mapping, branch, alpha)
    assert counting.calls == [kind]
    expected = _expected(kind, x, branch, alpha, mapping)
    assert_close(y, expected, torch.float64)
    g = torch.randn_like(y)
    inputs = (x, alpha) + ((branch,) if with_branch else ())
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(expected, inputs, g)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_direct_call_is_the_op_for_dispatch_modes(counting, kind):
    x, branch, alpha, mapping = _case(kind, torch.float32, grad=False)
    with OpLog() as log:
        entskip.skip_add(x, mapping, branch, alpha)
    assert counting.calls == [kind]
    assert f"entskip.{kind}_skip_add.default" in log.ops


@pytest.mark.parametrize("kind", KINDS)
def test_torch_function_modes_and_subclasses_go_through_torch_ops(counting, kind):
    x, branch, alpha, mapping = _case(kind, torch.float32, grad=False)

    class Log(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        y = entskip.skip_add(x, mapping, branch, alpha)
    assert f"entskip.{kind}_skip_add" in log.funcs  # the mode saw the op: torch.ops ran it

    class Sub(torch.Tensor):
        pass

    ys = entskip.skip_add(x.as_subclass(Sub), mapping, branch, alpha)
    assert type(ys) is Sub
    assert counting.calls == []
    assert torch.equal(ys.as_subclass(torch.Tensor), y)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_skip_add_does_not_break_the_graph(kind):
    x, branch, alpha, mapping = _case(kind, torch.float32, grad=False)
    compiled = torch.compile(lambda x, b, a: entskip.skip_add(x, mapping, b, a), backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, branch, alpha), entskip.skip_add(x, mapping, branch, alpha), torch.float32)


def test_direct_calls_raise_typed_errors():
    x = torch.randn(2, 4)
    alpha = torch.tensor(0.5)
    with pytest.raises(TypeError, match="branch must be a tensor"):
        _C.identity_skip_add(x, alpha, 3)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        _C.identity_skip_add(x, alpha)
    with pytest.raises(RuntimeError, match="branch must have x's shape"):
        _C.identity_skip_add(x, alpha, torch.randn(1, 4))
    index = torch.arange(4)
    with pytest.raises(RuntimeError, match="inverse is not the inverse permutation"):
        _C.permutation_skip_add(x, index, index.flip(0), alpha, None)


def _plain_case():
    x, branch = torch.randn(3, 8), torch.randn(3, 8)
    return {"x": x, "index": None, "inverse": None, "branch": branch, "alpha": torch.tensor(0.5), "features": 8}


class _Sub(torch.Tensor):
    pass


# What entskip._C.plain_skip_add leaves to skip_add's general path (which checks it and
# raises the documented errors, or runs it another way).
_DECLINED = {
    "x subclass": lambda a: a.update(x=a["x"].as_subclass(_Sub)),
    "x meta": lambda a: a.update(x=a["x"].to("meta"), branch=None),
    "x int": lambda a: a.update(x=torch.ones(3, 8, dtype=torch.int32), branch=None),
    "x 0-d": lambda a: a.update(x=torch.tensor(1.0), branch=None, features=-1),
    "x sparse": lambda a: a.update(x=a["x"].to_sparse(), branch=None),
    "features": lambda a: a.update(features=4),
    "alpha 1-d": lambda a: a.update(alpha=torch.tensor([0.5])),
    "alpha int": lambda a: a.update(alpha=torch.tensor(1)),
    "alpha inf": lambda a: a.update(alpha=torch.tensor(float("inf"))),
    "alpha nan": lambda a: a.update(alpha=torch.tensor(float("nan"), dtype=torch.bfloat16)),
    "alpha beyond float32": lambda a: a.update(alpha=torch.tensor(1e39, dtype=torch.float64)),
    "alpha meta": lambda a: a.update(alpha=torch.tensor(0.5, device="meta")),
    "alpha subclass": lambda a: a.update(alpha=a["alpha"].as_subclass(_Sub)),
    "branch shape": lambda a: a.update(branch=torch.randn(1, 8)),
    "branch dtype": lambda a: a.update(branch=a["branch"].double()),
    "branch subclass": lambda a: a.update(branch=a["branch"].as_subclass(_Sub)),
    "branch meta": lambda a: a.update(branch=a["branch"].to("meta")),
    "index subclass": lambda a: a.update(index=torch.arange(8).as_subclass(_Sub), inverse=torch.arange(8)),
    "index not a permutation": lambda a: a.update(index=torch.tensor([1, 1, 2, 3, 4, 5, 6, 7]), inverse=torch.arange(8)),
    "index out of range": lambda a: a.update(index=torch.tensor([8, 1, 2, 3, 4, 5, 6, 7]), inverse=torch.arange(8)),
    "inverse not the inverse": lambda a: a.update(index=torch.arange(8).flip(0), inverse=torch.arange(8)),
    "index int32": lambda a: a.update(index=torch.arange(8, dtype=torch.int32), inverse=torch.arange(8)),
    "index short": lambda a: a.update(index=torch.arange(7), inverse=torch.arange(7)),
    "index strided": lambda a: a.update(index=torch.arange(8).repeat_interleave(2)[::2], inverse=torch.arange(8)),
    "index meta": lambda a: a.update(index=torch.arange(8, device="meta"), inverse=torch.arange(8)),
}


@pytest.mark.parametrize("case", sorted(_DECLINED))
def test_plain_cpu_call_declines_what_it_does_not_serve(case):
    args = _plain_case()
    assert isinstance(_C.plain_skip_add(*args.values()), torch.Tensor)
    _DECLINED[case](args)
    assert _C.plain_skip_add(*args.values()) is None


def test_plain_cpu_call_runs_a_valid_permutation_pair():
    args = _plain_case()
    index = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    args.update(index=index, inverse=torch.argsort(index))
    expected = args["alpha"] * args["x"][:, index] + args["branch"]
    assert_close(_C.plain_skip_add(*args.values()), expected, torch.float32)


def test_plain_cpu_call_declines_under_autocast_and_torch_function_modes():
    args = _plain_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _C.plain_skip_add(*args.values()) is None
    with TorchFunctionMode():
        assert _C.plain_skip_add(*args.values()) is None


def test_plain_cpu_call_alpha_at_the_float32_limit():
    """alpha finite in float32 once rounded (the largest float32) runs; the next double that
    rounds to infinity is declined, and skip_add raises its ValueError for it."""
    args = _plain_case()
    args["alpha"] = torch.tensor(torch.finfo(torch.float32).max, dtype=torch.float64)
    assert isinstance(_C.plain_skip_add(*args.values()), torch.Tensor)
    args["alpha"] = torch.tensor(2.0**128 - 2.0**103, dtype=torch.float64)
    assert _C.plain_skip_add(*args.values()) is None
    with pytest.raises(ValueError, match="alpha must be finite"):
        entskip.skip_add(args["x"], None, args["branch"], args["alpha"])


def test_permutation_mapping_rechecks_a_replaced_or_edited_index():
    mapping = mappings.permutation(8).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    entskip.skip_add(x, mapping)
    mapping.index = mapping.index.clone()  # a new tensor object, still a permutation: passes again
    entskip.skip_add(x, mapping)
    mapping.index[0] = mapping.index[1]  # edited in place: its version moved on
    for backend in ("reference", "cpu"):  # the native one declines the plain path for it
        with entskip.use_backend(backend), pytest.raises(ValueError, match="edited in place"):
            entskip.skip_add(x, mapping)
    mapping.index = torch.tensor([1, 1, 2, 3, 4, 5, 6, 7])  # a fresh invalid tensor
    for backend in ("reference", "cpu"):
        with entskip.use_backend(backend), pytest.raises(ValueError, match="edited in place"):
            entskip.skip_add(x, mapping)


def test_permutation_mapping_pickled_without_a_check_record_checks_its_index():
    mapping = mappings.permutation(8).double()
    del mapping.__dict__["_passed"]  # as a mapping pickled whole before the record existed
    x = torch.randn(2, 8, dtype=torch.float64)
    assert_close(entskip.skip_add(x, mapping), reference.permutation_skip_add(x, mapping.index, None,
                                                                              torch.tensor(1.0, dtype=torch.float64)),
                 torch.float64)
    mapping.index[0] = mapping.index[1]
    with entskip.use_backend("reference"), pytest.raises(ValueError, match="edited in place"):
        entskip.skip_add(x, mapping)


def test_permutation_mapping_keeps_the_gpu_dispatch_record_of_index_and_inverse():
    """The mapping keeps its own record, so the GPU dispatch's record of the pair (index,
    inverse) survives a call (they once shared one entry and each call checked twice, with a
    device-to-host copy each on a GPU)."""
    mapping = mappings.permutation(8)
    x = torch.randn(2, 8)
    gpu_dispatch.validate_permutation(mapping.index, mapping.inverse, x)
    entskip.skip_add(x, mapping)
    assert versions.is_current((mapping.index, mapping.inverse), "permutation")
