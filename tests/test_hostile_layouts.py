"""Hostile layouts: a corrupted block-sparse layout never reaches a kernel.

Seeded random corruptions of every field of valid layouts (``crow_indices``, ``col_indices``,
the block size, the shape, the index tensors' dtype / dimensionality / type) are judged by an
independent validity oracle written here. Every corruption the oracle calls invalid must be
rejected with ``ValueError``/``TypeError`` by ``BlockLayout(...)``, by
``BlockSparseMapping.load_state_dict`` and by ``entskip.skip_add`` given a
``torch.sparse_bsr_tensor`` built with ``check_invariants=False``, while recorders on every
kernel entry point (the native ops and the reference functions) prove that no kernel was
called. A corruption that happens to be valid must be accepted (the oracle and the library agree).

Direct calls of ``torch.ops.entskip.bsr_skip_add`` / ``bsr_skip_add_backward`` with malformed
index tensors (``ccol``/``row``/``perm`` too: out of range, unordered, wrong length, dtype or
dims, non-contiguous, or in range but inconsistent with the rest of the layout) run in a
subprocess: each must raise ``RuntimeError`` (or, when that call never reads the corrupted
field, return exactly the uncorrupted result), and the process must end normally, not by a
signal.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import entskip
from entskip import BlockLayout, mappings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # sparse BSR "beta" / invariant-check warnings

FIELDS = ("crow", "col", "block", "shape")
DRAWS_PER_FIELD = 30


# ---------------------------------------------------------------------------------------------
# Valid layouts, an independent oracle, and random corruptions
# ---------------------------------------------------------------------------------------------


def valid_layouts():
    """Seeded valid layouts ``(crow, col, block, shape)`` as Python lists / ints: rectangular,
    with empty rows, empty, full, a single block."""
    out = []
    for seed in range(12):
        rng = random.Random(seed)
        b = rng.choice((1, 2, 4, 8))
        r, c = rng.randint(1, 6), rng.randint(1, 6)
        density = rng.choice((0.0, 0.3, 0.6, 1.0)) if seed >= 3 else (0.0, 1.0, 0.5)[seed]
        mask = [[rng.random() < density for _ in range(c)] for _ in range(r)]
        if seed % 2 and r > 1:
            mask[rng.randrange(r)] = [False] * c  # an empty block row
        crow, col = [0], []
        for row in mask:
            col += [j for j, on in enumerate(row) if on]
            crow.append(len(col))
        out.append((crow, col, b, (r * b, c * b)))
    out.append(([0, 1], [0], 4, (4, 4)))  # a single block
    return out


VALID = valid_layouts()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def oracle(crow, col, block, shape) -> str | None:
    """Why ``(crow, col, block, shape)`` is not a valid layout, or None if it is (written from the spec)."""
    if not _is_int(block) or block < 1:
        return "block"
    if not isinstance(shape, tuple) or len(shape) != 2 or not all(_is_int(s) for s in shape):
        return "shape type"
    if min(shape) < 1 or shape[0] % block or shape[1] % block:
        return "shape"
    for t in (crow, col):
        if not isinstance(t, torch.Tensor):
            return "index type"
        if t.dim() != 1:
            return "index dim"
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            return "index dtype"
    c, k = crow.tolist(), col.tolist()
    rows, cols = shape[0] // block, shape[1] // block
    if len(c) != rows + 1 or c[0] != 0 or c[-1] != len(k):
        return "crow length/ends"
    if any(c[i] > c[i + 1] for i in range(rows)):
        return "crow order"
    for i in range(rows):
        row = k[c[i] : c[i + 1]]
        if any(not 0 <= j < cols for j in row):
            return "col range"
        if any(row[a] >= row[a + 1] for a in range(len(row) - 1)):
            return "col order"
    return None


def _retype(values: list, rng: random.Random):
    """The same entries with a bad container: float/bool/complex dtype, 2-D or 0-d, list, numpy."""
    how = rng.choice(("float32", "float64", "bool", "complex64", "2d", "0d", "list", "numpy"))
    t = torch.tensor(values, dtype=torch.int64)
    if how in ("float32", "float64", "bool", "complex64"):
        return t.to(getattr(torch, how)), how
    if how == "2d":
        return (t.unsqueeze(0) if rng.random() < 0.5 else t.reshape(-1, 1)), how
    if how == "0d":
        return torch.tensor(values[0] if values else 0), how
    if how == "list":
        return list(values), how
    return np.asarray(values, dtype=np.int64), how


BIG = (-(2**63), -(2**62), -1, 2**62, 2**63 - 1)


def corrupt(case, field: str, rng: random.Random):
    """One random corruption of ``field``: ``(crow, col, block, shape, description)``."""
    crow, col, b, shape = list(case[0]), list(case[1]), case[2], case[3]
    crow_t = col_t = None
    what = field
    if field in ("crow", "col"):
        v = crow if field == "crow" else col
        op = rng.choice(("set", "swap", "dup", "drop", "insert", "retype"))
        if not v and op in ("set", "swap", "dup", "drop"):
            op = "insert"
        if op == "set":
            i = rng.randrange(len(v))
            bound = len(col) if field == "crow" else shape[1] // b
            v[i] = rng.choice((v[i] + rng.choice((-2, -1, 1, 2)), bound, bound + rng.randint(1, 5), *BIG))
        elif op == "swap":
            i, j = rng.randrange(len(v)), rng.randrange(len(v))
            v[i], v[j] = v[j], v[i]
        elif op == "dup":
            i = rng.randrange(len(v))
            v[i] = v[i - 1] if i else v[min(1, len(v) - 1)]
        elif op == "drop":
            del v[rng.randrange(len(v))]
        elif op == "insert":
            v.insert(rng.randint(0, len(v)), rng.choice((0, 1, rng.randint(0, 8), *BIG)))
        what = f"{field}:{op}"
        if op == "retype":
            bad, how = _retype(v, rng)
            what += f":{how}"
            if field == "crow":
                crow_t = bad
            else:
                col_t = bad
    elif field == "block":
        b = rng.choice((0, -b, b + 1, 2 * b, max(b // 2, 1) if b > 1 else 3, float(b), True, None, "8", 1.5))
        what = f"block={b!r}"
    elif field == "shape":
        r, c = shape
        shape = rng.choice(
            (
                (r + b, c),
                (r, c + b),  # may stay valid: the oracle decides
                (r - b, c),
                (r, c - b),
                (2 * r, c),
                (r + 1, c) if b > 1 else (r, c * 3 + b),
                (r, c + 1) if b > 1 else (0, c),
                (0, c),
                (r, -c),
                (r,),
                (r, c, 1),
                None,
            )
        )
        what = f"shape={shape!r}"
    crow_obj = crow_t if crow_t is not None else torch.tensor(crow, dtype=torch.int64)
    col_obj = col_t if col_t is not None else torch.tensor(col, dtype=torch.int64)
    return crow_obj, col_obj, b, shape, what


def corruptions(field):
    """Seeded corruptions of one field over all valid layouts: ``(case, crow, col, block, shape, what)``."""
    for n, case in enumerate(VALID):
        rng = random.Random(f"{field}-{n}")
        for _ in range(DRAWS_PER_FIELD):
            yield (case, *corrupt(case, field, rng))


def test_oracle_accepts_the_valid_layouts_and_agrees_with_blocklayout():
    for crow, col, b, shape in VALID:
        crow_t, col_t = torch.tensor(crow), torch.tensor(col, dtype=torch.int64)
        assert oracle(crow_t, col_t, b, shape) is None
        layout = BlockLayout(crow_t, col_t, b, shape)
        assert layout.crow_indices.tolist() == crow and layout.col_indices.tolist() == col
    # the oracle is not a rubber stamp
    assert oracle(torch.tensor([0, 1]), torch.tensor([1]), 4, (4, 4)) == "col range"
    assert oracle(torch.tensor([0, 2]), torch.tensor([1, 0]), 4, (4, 8)) == "col order"


# ---------------------------------------------------------------------------------------------
# Recorders on every kernel entry point
# ---------------------------------------------------------------------------------------------

NATIVE_OPS = ("bsr_skip_add", "bsr_skip_add_backward", "dense_skip_add", "dense_skip_add_backward")
REFERENCE_FUNCS = ("skip_add", "bsr_skip_add", "permutation_skip_add", "identity_skip_add")


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that records every call of a native op or a reference function (which still run)."""
    calls = []

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    for name in NATIVE_OPS:
        monkeypatch.setattr(torch.ops.entskip, name, recorder(f"torch.ops.entskip.{name}", getattr(torch.ops.entskip, name)))
    for name in REFERENCE_FUNCS:
        monkeypatch.setattr(entskip.reference, name, recorder(f"reference.{name}", getattr(entskip.reference, name)))
    return calls


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_recorders_see_the_kernels_of_valid_layouts(kernel_calls, backend):
    """Positive control: with a valid layout the recorders do see the kernel calls."""
    for crow, col, b, shape in VALID:
        values = torch.randn(len(col), b, b, dtype=torch.float64)
        bsr = torch.sparse_bsr_tensor(torch.tensor(crow), torch.tensor(col, dtype=torch.int64), values, shape)
        x = torch.randn(3, shape[1], dtype=torch.float64, requires_grad=True)
        kernel_calls.clear()
        with entskip.use_backend(backend):
            y = entskip.skip_add(x, bsr, None, 0.5)
            y.sum().backward()
        expected = "torch.ops.entskip.bsr_skip_add" if backend == "cpu" else "reference.bsr_skip_add"
        assert expected in kernel_calls, kernel_calls
        if backend == "cpu":
            assert "torch.ops.entskip.bsr_skip_add_backward" in kernel_calls
        torch.testing.assert_close(y.detach(), 0.5 * x.detach() @ bsr.to_dense().mT, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Random corruptions: BlockLayout, load_state_dict, skip_add with a sparse BSR tensor
# ---------------------------------------------------------------------------------------------


def _describe(case, what):
    return f"{what} of layout crow={case[0]} col={case[1]} block={case[2]} shape={case[3]}"


@pytest.mark.parametrize("field", FIELDS)
def test_blocklayout_rejects_corrupted_layouts(field, kernel_calls):
    invalid = valid = 0
    failures = []
    for case, crow, col, b, shape, what in corruptions(field):
        reason = oracle(crow, col, b, shape)
        if reason is None:  # the corruption happens to be another valid layout: it must be accepted
            valid += 1
            try:
                layout = BlockLayout(crow, col, b, shape)
            except (ValueError, TypeError) as err:
                failures.append(f"valid {_describe(case, what)} rejected: {err}")
                continue
            if layout.col_indices.tolist() != col.tolist() or layout.shape != shape:
                failures.append(f"valid {_describe(case, what)} changed: {layout}")
            continue
        invalid += 1
        try:
            layout = BlockLayout(crow, col, b, shape)
        except (ValueError, TypeError):
            continue
        except Exception as err:  # noqa: BLE001 - any other exception type is a failure too
            failures.append(f"{_describe(case, what)} ({reason}) raised {type(err).__name__}: {err}")
            continue
        failures.append(f"{_describe(case, what)} ({reason}) was ACCEPTED as {layout}")
    assert not failures, "\n".join(failures[:20])
    assert invalid >= DRAWS_PER_FIELD * len(VALID) // 2, f"only {invalid} corruptions of {field} were invalid"
    assert kernel_calls == []


@pytest.mark.parametrize("field", ["crow", "col"])
def test_load_state_dict_rejects_corrupted_layouts(field, kernel_calls):
    tested = 0
    failures = []
    for case, crow, col, b, shape, what in corruptions(field):
        reason = oracle(crow, col, b, shape)
        base = mappings.BlockSparseMapping(
            BlockLayout(torch.tensor(case[0]), torch.tensor(case[1], dtype=torch.int64), case[2], case[3]),
            torch.randn(len(case[1]), case[2], case[2], dtype=torch.float64),
        )
        before = {k: v.clone() for k, v in base.state_dict().items()}
        nnzb = col.shape[0] if isinstance(col, torch.Tensor) and col.dim() == 1 else len(case[1])
        sd = {"crow_indices": crow, "col_indices": col, "blocks": torch.randn(nnzb, b, b, dtype=torch.float64)}
        if reason is None:
            base.load_state_dict(sd)
            assert base.col_indices.tolist() == col.tolist(), _describe(case, what)
            continue
        tested += 1
        try:
            base.load_state_dict(sd)
            failures.append(f"{_describe(case, what)} ({reason}) was loaded")
        except ValueError:
            pass
        except Exception as err:  # noqa: BLE001
            failures.append(f"{_describe(case, what)} ({reason}) raised {type(err).__name__}: {err}")
        after = base.state_dict()
        if after.keys() != before.keys() or not all(torch.equal(after[k], before[k]) for k in before):
            failures.append(f"{_describe(case, what)}: a failed load changed the mapping")
    assert not failures, "\n".join(failures[:20])
    assert tested >= DRAWS_PER_FIELD * len(VALID) // 2
    assert kernel_calls == []


def _sparse_bsr(crow, col, b, shape):
    """A sparse BSR tensor without invariant checks, or None when torch itself refuses to build it."""
    try:
        ncol = col.shape[0] if isinstance(col, torch.Tensor) and col.dim() >= 1 else 1
        bs = b if _is_int(b) and b >= 1 else 4
        values = torch.randn(ncol, bs, bs, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_bsr_tensor(crow, col, values, shape, check_invariants=False)
    except Exception:  # noqa: BLE001 - torch refused it: nothing reaches entskip
        return None


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("field", FIELDS)
def test_skip_add_rejects_corrupted_sparse_bsr_before_any_kernel(field, backend, kernel_calls):
    built = refused = 0
    failures = []
    for case, crow, col, b, shape, what in corruptions(field):
        bsr = _sparse_bsr(crow, col, b, shape)
        if bsr is None:
            refused += 1
            continue
        # judge what torch built (it turns a list or array into a tensor, for instance)
        if oracle(bsr.crow_indices(), bsr.col_indices(), bsr.values().shape[-1], tuple(bsr.shape)) is None:
            continue
        built += 1
        d_in = bsr.shape[1] if bsr.dim() == 2 else case[3][1]
        x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
        kernel_calls.clear()
        try:
            with entskip.use_backend(backend):
                entskip.skip_add(x, bsr, None, 0.5)
            failures.append(f"{_describe(case, what)} ran")
        except (ValueError, TypeError):
            pass
        except Exception as err:  # noqa: BLE001
            failures.append(f"{_describe(case, what)} raised {type(err).__name__}: {err}")
        if kernel_calls:
            failures.append(f"{_describe(case, what)} reached {kernel_calls}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    # torch builds most corrupted tensors without checks; make sure entskip saw enough of them
    assert built >= 40, f"only {built} corrupted tensors of {field} were built ({refused} refused by torch)"


# ---------------------------------------------------------------------------------------------
# Regressions: holes seen while this suite was written (fixed in 508efb7)
# ---------------------------------------------------------------------------------------------

CROW, COL = [0, 2, 3, 3, 5], [0, 2, 1, 1, 3]  # a valid 4 x 4 block layout, block 8, shape (32, 32)


@pytest.mark.parametrize("shape", [(32.5, 32), (32, 32.9), ("32", 32)], ids=["rows_32.5", "cols_32.9", "rows_str"])
def test_blocklayout_rejects_non_integral_shape(shape):
    """Regression: `int(s) for s in shape` truncated 32.5 to 32 and parsed '32'."""
    with pytest.raises((ValueError, TypeError)):
        BlockLayout(torch.tensor(CROW), torch.tensor(COL), 8, shape)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("values_shape", [(6, 8, 8), (4, 8, 8), (5, 4, 8)], ids=["nnzb+1", "nnzb-1", "non_square"])
def test_skip_add_rejects_bsr_values_that_do_not_fit_the_layout(values_shape, backend, kernel_calls):
    """Regression: values of the wrong block count or non-square blocks reached the kernel (RuntimeError
    from the cpu checks, einsum/index_add errors in the reference) instead of a ValueError before it."""
    bsr = torch.sparse_bsr_tensor(
        torch.tensor(CROW), torch.tensor(COL), torch.randn(values_shape, dtype=torch.float64), (32, 32), check_invariants=False
    )
    with entskip.use_backend(backend), pytest.raises(ValueError):
        entskip.skip_add(torch.randn(3, 32, dtype=torch.float64), bsr)
    assert kernel_calls == []


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_skip_add_rejects_complex_bsr_values(backend):
    """Regression: `values.to(x.dtype)` silently dropped the imaginary part of a complex BSR mapping."""
    values = torch.randn(5, 8, 8, dtype=torch.complex128)
    bsr = torch.sparse_bsr_tensor(torch.tensor(CROW), torch.tensor(COL), values, (32, 32))
    with entskip.use_backend(backend), pytest.raises(TypeError):
        entskip.skip_add(torch.randn(3, 32, dtype=torch.float64), bsr)


def test_dense_complex_mapping_is_rejected():
    """The control for the test above: the dense path already rejects a complex mapping."""
    with pytest.raises(TypeError):
        entskip.skip_add(torch.randn(3, 32, dtype=torch.float64), torch.randn(32, 32, dtype=torch.complex128))


def _strided(values):
    """``values`` as a non-contiguous (stride 2) int64 view: the column of a 2-D table."""
    table = torch.stack([torch.tensor(values, dtype=torch.int64), torch.full((len(values),), 7, dtype=torch.int64)], 1)
    view = table[:, 0]
    assert not view.is_contiguous() and view.tolist() == list(values)
    return view


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("field", ["crow", "col"])
def test_valid_layout_with_non_contiguous_indices_computes_the_same(field, backend):
    """Regression: layout.py `_index_tensor` kept a non-contiguous int64 view as is and the cpu kernel
    read index tensors through `data_ptr`: it read the raw storage, not the tensor's entries, and
    returned a wrong result silently (a stride-0 expanded index read past its storage, see below)."""
    crow = _strided(CROW) if field == "crow" else torch.tensor(CROW)
    col = _strided(COL) if field == "col" else torch.tensor(COL)
    values = torch.randn(5, 8, 8, dtype=torch.float64)
    hostile = mappings.BlockSparseMapping(BlockLayout(crow, col, 8, (32, 32)), values)
    plain = mappings.BlockSparseMapping(BlockLayout(torch.tensor(CROW), torch.tensor(COL), 8, (32, 32)), values)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 32, dtype=torch.float64)
    with entskip.use_backend(backend):
        y1 = entskip.skip_add(x, hostile, None, 0.5)
        (dx1,) = torch.autograd.grad(y1, x, g)
        y2 = entskip.skip_add(x, plain, None, 0.5)
        (dx2,) = torch.autograd.grad(y2, x, g)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)


_EXPANDED_INDEX = textwrap.dedent(
    """
    import torch, entskip
    from entskip import BlockLayout, mappings
    R = 64  # one block per row, all in block column 0: col is an expanded (stride 0) view of one zero
    crow, col = torch.arange(R + 1), torch.zeros(1, dtype=torch.int64).expand(R)
    values = torch.randn(R, 4, 4, dtype=torch.float64)
    hostile = mappings.BlockSparseMapping(BlockLayout(crow, col, 4, (4 * R, 16)), values)
    plain = mappings.BlockSparseMapping(BlockLayout(crow, col.contiguous(), 4, (4 * R, 16)), values)
    x = torch.randn(3, 16, dtype=torch.float64)
    with entskip.use_backend("cpu"):
        same = torch.equal(entskip.skip_add(x, hostile), entskip.skip_add(x, plain))
    print("SAME" if same else "DIFFERENT")
    """
)


def test_valid_layout_with_expanded_indices_runs_in_subprocess():
    """Regression: an expanded (stride-0) col_indices made the cpu kernel's checks and loop read past the
    index tensor's one-element storage (garbage 'col_indices[1] = <huge> is out of range')."""
    out = subprocess.run([sys.executable, "-c", _EXPANDED_INDEX], capture_output=True, text=True, timeout=120)
    assert out.returncode >= 0, f"killed by signal {-out.returncode}"
    assert out.returncode == 0 and out.stdout.strip() == "SAME", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Direct native calls with malformed index tensors (in a subprocess: a crash cannot take pytest down)
# ---------------------------------------------------------------------------------------------

_NATIVE_CAMPAIGN = textwrap.dedent(
    """
    import json, random, sys
    import torch, entskip
    from entskip import BlockLayout

    BIG = (-(2**63), -(2**62), -1, 2**62, 2**63 - 1)
    NAMES = ("crow", "col", "ccol", "row", "perm")
    MASKS = ([True, True, True], [True, False, False], [False, True, False], [False, False, True])
    draws = int(sys.argv[1])
    stats = {"cases": 0, "calls": 0, "raised": 0, "unaffected": 0, "inconsistent": 0, "non-contiguous": 0}
    violations = []

    def layouts():
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            b = (1, 2, 4, 8)[seed % 4]
            r, c = 1 + seed % 5, 1 + (seed * 3) % 5
            mask = torch.rand(r, c, generator=g) < (0.2 + 0.1 * seed)
            mask[0, 0] = True  # at least one block, so every field has an entry to corrupt
            yield BlockLayout.from_mask(mask, b), g

    def inconsistent(v, name, layout, rng):
        # in range, but no longer the layout: col unsorted within a row; the transposed fields
        # (ccol/row/perm) not describing the transpose of crow/col. None if there is no such change.
        if name == "col":
            crow = layout.crow_indices.tolist()
            pairs = [(k, k + 1) for i in range(len(crow) - 1) for k in range(crow[i], crow[i + 1] - 1)]
        elif name == "ccol":
            pairs = [(i, i) for i in range(1, len(v) - 1) if v[i] + 1 <= v[i + 1]]
            if not pairs:
                return None
            i = rng.choice(pairs)[0]
            v[i] += 1  # one block moves to the previous column; pointers stay monotone
            return v
        else:
            pairs = [(i, j) for i in range(len(v)) for j in range(len(v)) if v[i] != v[j]]
        if not pairs:
            return None
        i, j = rng.choice(pairs)
        if name != "col" and rng.random() < 0.5:
            v[i] = v[j]  # a repeated entry
        else:
            v[i], v[j] = v[j], v[i]
        return v

    def malformed(t, name, layout, rng):
        # out of range, broken pointer order / ends, wrong length, dtype, dims, non-contiguous,
        # or in range but inconsistent with the rest of the layout
        nrows, ncols = layout.shape[0] // layout.block, layout.shape[1] // layout.block
        v = t.tolist()
        op = rng.choice(("range", "order", "length", "dtype", "dims", "strided", "inconsistent"))
        if op == "strided":  # the same entries in a non-contiguous view
            view = torch.stack([t, t + 99], 1)[:, 0]
            assert not view.is_contiguous() or view.numel() <= 1
            return view, f"{name} non-contiguous"
        if op == "inconsistent" and name != "crow":
            w = inconsistent(list(v), name, layout, rng)
            if w is not None:
                return torch.tensor(w, dtype=torch.int64), f"{name} inconsistent {v} -> {w}"
            op = "range"
        if op == "range":
            i = rng.randrange(len(v))
            bound = {"crow": layout.nnzb, "ccol": layout.nnzb, "col": ncols, "row": nrows, "perm": layout.nnzb}[name]
            v[i] = rng.choice((bound + 1, bound + rng.randint(2, 9), -1, *BIG)) if name in ("crow", "ccol") else rng.choice((bound, bound + rng.randint(1, 9), *BIG))
            return torch.tensor(v, dtype=torch.int64), f"{name}[{i}]={v[i]}"
        if op == "order" and name in ("crow", "ccol") and len(v) > 2 and v[-1] > 0:
            i = rng.randrange(1, len(v) - 1)
            v[i] = v[-1] + 1 if rng.random() < 0.5 else -1
            return torch.tensor(v, dtype=torch.int64), f"{name} order at {i}"
        if op == "length" or op == "order":
            if name in ("crow", "ccol"):
                # a pointer array that no longer ends at nnzb (a shorter one that still did would be
                # a valid layout with fewer rows: the ops take the row count from crow)
                v = v[:-1] if (len(v) > 1 and v[-2] != v[-1]) else v + [v[-1] + rng.choice((1, 2**40))]
            else:  # one entry per block: the length must match values
                v = v[:-1] if (rng.random() < 0.5 and v) else v + [rng.choice((0, 1, 2**62))]
            return torch.tensor(v, dtype=torch.int64), f"{name} length {len(v)}"
        if op == "dtype":
            dt = rng.choice((torch.int32, torch.int16, torch.float64))
            return t.to(dt), f"{name} dtype {dt}"
        return t.reshape(-1, 1), f"{name} 2-D"

    def calls(x, g, values, idx, alpha):
        yield "forward", lambda: torch.ops.entskip.bsr_skip_add(x, values, *idx, alpha, None)
        for m in MASKS:
            yield f"backward{m}", lambda m=m: torch.ops.entskip.bsr_skip_add_backward(g, x, values, *idx, alpha, m)

    for layout, gen in layouts():
        rng = random.Random(layout.nnzb * 7919 + layout.block)
        nrows = layout.shape[0] // layout.block
        x = torch.randn(5, layout.shape[1], dtype=torch.float64, generator=gen)
        g = torch.randn(5, layout.shape[0], dtype=torch.float64, generator=gen)
        values = torch.randn(layout.nnzb, layout.block, layout.block, dtype=torch.float64, generator=gen)
        alpha = torch.tensor(0.7, dtype=torch.float64)
        good = {name: fn() for name, fn in calls(x, g, values, layout.tensors(), alpha)}
        for _ in range(draws):
            which = rng.randrange(5)
            idx = list(layout.tensors())
            idx[which], what = malformed(idx[which], NAMES[which], layout, rng)
            stats["cases"] += 1
            stats["inconsistent"] += "inconsistent" in what
            stats["non-contiguous"] += "non-contiguous" in what
            for name, fn in calls(x, g, values, idx, alpha):
                stats["calls"] += 1
                try:
                    out = fn()
                except RuntimeError:
                    stats["raised"] += 1
                    continue
                except Exception as err:
                    violations.append(f"{what}: {name} raised {type(err).__name__}: {err}")
                    continue
                ref = good[name]
                outs = out if isinstance(out, (tuple, list)) else (out,)
                refs = ref if isinstance(ref, (tuple, list)) else (ref,)
                if all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in zip(outs, refs)):
                    stats["unaffected"] += 1  # this call never reads the corrupted field
                else:
                    violations.append(f"{what}: {name} returned a different result without an error")
    print(json.dumps({"stats": stats, "violations": violations}))
    """
)


def test_native_ops_reject_malformed_index_tensors_in_subprocess():
    out = subprocess.run(
        [sys.executable, "-c", _NATIVE_CAMPAIGN, "40"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode >= 0, f"the campaign was killed by signal {-out.returncode}: {out.stderr[-2000:]}"
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    stats, violations = report["stats"], report["violations"]
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:20])
    assert stats["cases"] == 8 * 40 and stats["calls"] == 5 * stats["cases"]
    # most calls read the corrupted field and must have raised
    assert stats["raised"] >= stats["calls"] // 2, stats
    assert stats["inconsistent"] >= 20 and stats["non-contiguous"] >= 20, stats


_SINGLE_CALL = textwrap.dedent(
    """
    import sys, torch, entskip
    from entskip import mappings
    m = mappings.sparse(64, density=0.5, block=8, seed=0, dtype=torch.float64)
    idx = list(m.layout.tensors())
    field, index, value, op = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    i = ("crow", "col", "ccol", "row", "perm").index(field)
    idx[i] = idx[i].clone()
    idx[i][index] = value
    x = torch.randn(4, 64, dtype=torch.float64)
    a = torch.tensor(1.0, dtype=torch.float64)
    if op == "forward":
        torch.ops.entskip.bsr_skip_add(x, m.blocks, *idx, a, None)
    else:
        torch.ops.entskip.bsr_skip_add_backward(x, x, m.blocks, *idx, a, [True, True, True])
    print("RETURNED")
    """
)


@pytest.mark.parametrize(
    "field, index, value, op",
    [
        ("col", 3, 2**62, "forward"),
        ("col", 0, -(2**63), "backward"),
        ("crow", 2, 10**6, "forward"),
        ("ccol", -1, 2**40, "backward"),
        ("row", 5, -7, "backward"),
        ("perm", 1, 2**63 - 1, "backward"),
    ],
)
def test_single_malformed_call_is_a_python_exception_not_a_signal(field, index, value, op):
    out = subprocess.run(
        [sys.executable, "-c", _SINGLE_CALL, field, str(index), str(value), op], capture_output=True, text=True, timeout=120
    )
    assert out.returncode >= 0, f"killed by signal {-out.returncode}"
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "RuntimeError" in out.stderr and "RETURNED" not in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "field, corrupt",
    [
        ("perm", lambda t: torch.cat([t[:1], t[:1], t[2:]])),  # a repeated entry
        ("perm", lambda t: t.roll(1)),  # a permutation, but the wrong one
        ("row", lambda t: t.flip(0)),
        ("ccol", lambda t: torch.cat([t[:1], t[1:-1] + 1, t[-1:]]).clamp(max=int(t[-1]))),
        ("col", lambda t: torch.cat([t[1:2], t[:1], t[2:]])),  # unsorted within row 0
    ],
    ids=["perm_repeat", "perm_rolled", "row_flipped", "ccol_shifted", "col_unsorted"],
)
def test_native_ops_reject_inconsistent_layouts(field, corrupt):
    """Regression: the native checks were bounds checks only; in-range transposed fields that do not
    describe the CSR layout, or an unsorted row, ran and returned a wrong dx silently."""
    m = mappings.sparse(64, density=0.5, block=8, seed=0, dtype=torch.float64)
    names = ("crow", "col", "ccol", "row", "perm")
    idx = list(m.layout.tensors())
    i = names.index(field)
    idx[i] = corrupt(idx[i].clone())
    assert not torch.equal(idx[i], m.layout.tensors()[i])
    x = torch.randn(4, 64, dtype=torch.float64)
    a = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.ops.entskip.bsr_skip_add_backward(x, x, m.blocks, *idx, a, [True, True, True])
