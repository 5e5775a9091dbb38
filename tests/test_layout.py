"""BlockLayout: construction, validation, cached transpose, and layouts loaded through state_dict."""

import pytest
import torch

import entskip
from entskip import BlockLayout
from entskip import mappings as M


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_mask(rows, cols, p, seed):
    return torch.rand(rows, cols, generator=_gen(seed)) < p


def _values(layout, seed, dtype=torch.float64):
    b = layout.block
    return torch.randn(layout.nnzb, b, b, generator=_gen(seed), dtype=dtype)


# Shapes (rows, cols), block, mask density; includes rectangular ones and masks with empty rows/cols.
CASES = [
    ((64, 64), 8, 0.4, 0),
    ((32, 96), 8, 0.5, 1),
    ((128, 32), 16, 0.3, 2),
    ((48, 48), 4, 0.2, 3),
    ((256, 128), 32, 0.6, 4),
]


def _layout(case):
    (rows, cols), b, p, seed = case
    mask = _random_mask(rows // b, cols // b, p, seed)
    # Force an empty block row and an empty block column to exercise the edge cases.
    mask[0, :] = False
    mask[:, -1] = False
    return BlockLayout.from_mask(mask, b), mask


# ---------------------------------------------------------------------------------------------
# Valid construction
# ---------------------------------------------------------------------------------------------


def test_construct_from_crow_col():
    crow = torch.tensor([0, 2, 2, 3, 5])
    col = torch.tensor([0, 3, 1, 0, 2])
    layout = BlockLayout(crow, col, 4, (16, 16))
    assert layout.block == 4 and layout.shape == (16, 16)
    assert layout.nnzb == 5
    assert layout.density == pytest.approx(5 / 16)
    assert torch.equal(layout.crow_indices, crow)
    assert torch.equal(layout.col_indices, col)
    for t in layout.tensors():
        assert t.dtype == torch.int64
    # Transposed cache, worked out by hand. Blocks (row, col): k0 (0,0) k1 (0,3) k2 (2,1) k3 (3,0) k4 (3,2).
    # Column order: col 0 -> k0 (row 0), k3 (row 3); col 1 -> k2 (row 2); col 2 -> k4 (row 3); col 3 -> k1 (row 0).
    assert layout.ccol_indices.tolist() == [0, 2, 3, 4, 5]
    assert layout.row_indices.tolist() == [0, 3, 2, 3, 0]
    assert layout.perm.tolist() == [0, 3, 2, 4, 1]


def test_construct_int32_indices_are_stored_as_int64():
    layout = BlockLayout(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), 8, (16, 16))
    assert all(t.dtype == torch.int64 for t in layout.tensors())
    assert layout.col_indices.tolist() == [1, 0]


def test_empty_layout():
    layout = BlockLayout(torch.zeros(5, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 8, (32, 16))
    assert layout.nnzb == 0 and layout.density == 0.0
    assert layout.ccol_indices.tolist() == [0, 0, 0]
    assert torch.equal(layout.to_dense(torch.zeros(0, 8, 8)), torch.zeros(32, 16))


@pytest.mark.parametrize("case", CASES)
def test_from_mask(case):
    layout, mask = _layout(case)
    (rows, cols), b, _, _ = case
    assert layout.shape == (rows, cols) and layout.block == b
    assert layout.nnzb == int(mask.sum())
    assert layout.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(layout.crow_indices.diff(), mask.sum(1))
    # Same layout as the explicit construction from the mask's CSR form.
    rr, cc = mask.nonzero(as_tuple=True)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rr, minlength=mask.shape[0]).cumsum(0)
    assert layout == BlockLayout(crow, cc, b, (rows, cols))
    # The dense pattern of ones sits exactly on the mask's blocks.
    ones = torch.ones(layout.nnzb, b, b)
    pattern = layout.to_dense(ones)
    assert torch.equal(pattern, mask.float().repeat_interleave(b, 0).repeat_interleave(b, 1))


def test_from_mask_rejects_non_2d():
    with pytest.raises(ValueError, match="mask"):
        BlockLayout.from_mask(torch.ones(2, 2, 2, dtype=torch.bool), 4)


@pytest.mark.parametrize("case", CASES)
def test_transposed_cache_blockwise(case):
    layout, mask = _layout(case)
    values = _values(layout, seed=10 + case[3])
    dense = layout.to_dense(values)
    b = layout.block
    ncols = layout.shape[1] // b
    ccol, rows, perm = layout.ccol_indices, layout.row_indices, layout.perm
    assert ccol.numel() == ncols + 1
    assert int(ccol[0]) == 0 and int(ccol[-1]) == layout.nnzb
    assert bool((ccol.diff() >= 0).all())
    assert torch.equal(ccol.diff(), mask.sum(0))
    assert torch.equal(torch.sort(perm).values, torch.arange(layout.nnzb))
    seen = set()
    for j in range(ncols):
        column_rows = rows[ccol[j] : ccol[j + 1]]
        assert bool((column_rows.diff() > 0).all()), "rows within a block column must be strictly increasing"
        for t in range(int(ccol[j]), int(ccol[j + 1])):
            r = int(rows[t])
            assert bool(mask[r, j])
            block = dense[r * b : (r + 1) * b, j * b : (j + 1) * b]
            assert torch.equal(values[perm[t]], block)
            seen.add((r, j))
    assert len(seen) == layout.nnzb


@pytest.mark.parametrize("case", CASES)
def test_transpose_dense(case):
    layout, mask = _layout(case)
    values = _values(layout, seed=20 + case[3])
    t = layout.transpose()
    assert t.shape == (layout.shape[1], layout.shape[0])
    assert torch.equal(t.to_dense(values[layout.perm].mT), layout.to_dense(values).T)
    # The transpose is itself a valid layout: re-validating its CSR fields gives the same cache.
    fresh = BlockLayout(t.crow_indices, t.col_indices, t.block, t.shape)
    assert fresh == t
    for a, b in zip(fresh.tensors(), t.tensors()):
        assert torch.equal(a, b)
    assert fresh == BlockLayout.from_mask(mask.T, layout.block)


@pytest.mark.parametrize("case", CASES)
def test_transpose_twice_is_identity(case):
    layout, _ = _layout(case)
    tt = layout.transpose().transpose()
    assert tt == layout
    assert tt.shape == layout.shape
    for a, b in zip(tt.tensors(), layout.tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_gather_inverts_to_dense(case):
    layout, mask = _layout(case)
    values = _values(layout, seed=30 + case[3])
    assert torch.equal(layout.gather(layout.to_dense(values)), values)
    # On a full dense matrix gather keeps exactly the layout's blocks.
    dense = torch.randn(*layout.shape, generator=_gen(40 + case[3]), dtype=torch.float64)
    b = layout.block
    keep = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    assert torch.equal(layout.to_dense(layout.gather(dense)), torch.where(keep, dense, 0.0))
    with pytest.raises(ValueError, match="shape"):
        layout.gather(dense[:-b])


@pytest.mark.parametrize("case", CASES)
def test_to_sparse_bsr(case):
    layout, _ = _layout(case)
    values = _values(layout, seed=50 + case[3])
    bsr = layout.to_sparse_bsr(values)
    assert bsr.layout == torch.sparse_bsr
    assert torch.equal(bsr.to_dense(), layout.to_dense(values))


def test_equality():
    mask = _random_mask(4, 4, 0.5, 7)
    a = BlockLayout.from_mask(mask, 8)
    assert a == BlockLayout.from_mask(mask.clone(), 8)
    assert a != BlockLayout.from_mask(mask, 4)  # other block size / shape
    other = mask.clone()
    other[0, 0] = not bool(other[0, 0])
    assert a != BlockLayout.from_mask(other, 8)


# ---------------------------------------------------------------------------------------------
# Malformed layouts
# ---------------------------------------------------------------------------------------------

# A valid 4 x 4 block layout (block 8, shape 32 x 32) with rows of 2, 1, 0, 2 blocks.
CROW = [0, 2, 3, 3, 5]
COL = [0, 2, 1, 1, 3]


def _t(x, dtype=torch.int64):
    return torch.tensor(x, dtype=dtype)


def test_reference_layout_is_valid():
    layout = BlockLayout(_t(CROW), _t(COL), 8, (32, 32))
    assert layout.nnzb == 5


BAD_LAYOUTS = [
    # id, crow, col, block, shape, error, match
    ("crow_not_monotone", _t([0, 3, 2, 3, 5]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*non-decreasing"),
    ("crow_not_monotone_negative", _t([0, 2, -1, 3, 5]), _t(COL), 8, (32, 32), ValueError, "crow_indices"),
    ("crow_first_not_zero", _t([1, 2, 3, 3, 5]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*start at 0"),
    ("crow_last_too_small", _t([0, 2, 3, 3, 4]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*end"),
    ("crow_last_too_large", _t([0, 2, 3, 3, 6]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*end"),
    ("crow_too_short", _t([0, 2, 3, 5]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*entries"),
    ("crow_too_long", _t([0, 2, 3, 3, 5, 5]), _t(COL), 8, (32, 32), ValueError, "crow_indices.*entries"),
    ("col_negative", _t(CROW), _t([0, 2, -1, 1, 3]), 8, (32, 32), ValueError, "col_indices"),
    ("col_too_large", _t(CROW), _t([0, 2, 1, 1, 4]), 8, (32, 32), ValueError, "col_indices"),
    ("col_far_too_large", _t(CROW), _t([0, 99, 1, 1, 3]), 8, (32, 32), ValueError, "col_indices"),
    ("col_unsorted", _t(CROW), _t([2, 0, 1, 1, 3]), 8, (32, 32), ValueError, "col_indices.*sorted"),
    ("col_duplicate", _t(CROW), _t([0, 0, 1, 1, 3]), 8, (32, 32), ValueError, "col_indices.*duplicate"),
    ("crow_float", _t(CROW, torch.float32), _t(COL), 8, (32, 32), TypeError, "crow_indices.*integer"),
    ("col_float", _t(CROW), _t(COL, torch.float64), 8, (32, 32), TypeError, "col_indices.*integer"),
    ("col_bool", _t(CROW), _t([1, 1, 1, 1, 1], torch.bool), 8, (32, 32), TypeError, "col_indices"),
    ("crow_2d", _t(CROW).unsqueeze(0), _t(COL), 8, (32, 32), ValueError, "crow_indices.*1-D"),
    ("col_2d", _t(CROW), _t(COL).unsqueeze(1), 8, (32, 32), ValueError, "col_indices.*1-D"),
    ("crow_list", CROW, _t(COL), 8, (32, 32), TypeError, "crow_indices"),
    ("block_zero", _t(CROW), _t(COL), 0, (32, 32), ValueError, "block"),
    ("block_negative", _t(CROW), _t(COL), -8, (32, 32), ValueError, "block"),
    ("block_float", _t(CROW), _t(COL), 8.0, (32, 32), ValueError, "block"),
    ("block_bool", _t(CROW), _t(COL), True, (32, 32), ValueError, "block"),
    ("shape_rows_not_divisible", _t(CROW), _t(COL), 8, (30, 32), ValueError, "shape"),
    ("shape_cols_not_divisible", _t(CROW), _t(COL), 8, (32, 36), ValueError, "shape"),
    ("shape_zero", _t([0]), _t([]), 8, (0, 32), ValueError, "shape"),
    ("shape_3d", _t(CROW), _t(COL), 8, (32, 32, 1), ValueError, "shape"),
]


@pytest.mark.parametrize(
    "crow,col,block,shape,error,match", [case[1:] for case in BAD_LAYOUTS], ids=[case[0] for case in BAD_LAYOUTS]
)
def test_malformed_layout_raises(crow, col, block, shape, error, match):
    with pytest.raises(error, match=match):
        BlockLayout(crow, col, block, shape)


def test_malformed_col_across_row_boundary_is_valid():
    # A decrease in col between two *different* rows is fine (sortedness is per row).
    layout = BlockLayout(_t([0, 2, 3]), _t([1, 3, 0]), 8, (16, 32))
    assert layout.nnzb == 3


# ---------------------------------------------------------------------------------------------
# Layouts through a mapping's state_dict
# ---------------------------------------------------------------------------------------------


def _mapping(seed=0, density=0.5, learnable=False):
    return M.sparse(64, density=density, block=8, seed=seed, learnable=learnable, construction="random")


def _sd(mapping):
    # state_dict() shares storage with the module's buffers: edit copies only.
    return {k: v.detach().clone() for k, v in mapping.state_dict().items()}


def _snapshot(mapping):
    return {name: t.detach().clone() for name, t in list(mapping.named_buffers()) + list(mapping.named_parameters())}


def _run(mapping, seed=123):
    g = _gen(seed)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    r = torch.randn(5, 64, generator=g)
    y = entskip.skip_add(x, mapping, r, alpha=0.7)
    (y * torch.randn(5, 64, generator=g)).sum().backward()
    return y.detach(), x.grad


def _edit(name, fn):
    def apply(sd):
        sd[name] = fn(sd[name].clone())
        return sd

    return apply


def _set(name, idx, value):
    def fn(t):
        t[idx] = value
        return t

    return _edit(name, fn)


def _swap_first_two_cols(sd):
    col = sd["col_indices"].clone()
    col[0], col[1] = col[1].clone(), col[0].clone()
    sd["col_indices"] = col
    return sd


# sparse(64, density=0.5, block=8, construction="random"): 8 block rows of 4 blocks each, crow = [0, 4, 8, ..., 32].
SD_CORRUPTIONS = [
    ("crow_not_monotone", _set("crow_indices", 2, 20), "crow_indices"),
    ("crow_first_not_zero", _set("crow_indices", 0, 1), "crow_indices"),
    ("crow_last_not_nnzb", _set("crow_indices", -1, 31), "crow_indices"),
    ("crow_too_short", _edit("crow_indices", lambda t: t[:-1]), "crow_indices"),
    ("crow_too_long", _edit("crow_indices", lambda t: torch.cat([t, t[-1:]])), "crow_indices"),
    ("col_negative", _set("col_indices", 0, -1), "col_indices"),
    ("col_too_large", _set("col_indices", 0, 99), "col_indices"),
    ("col_just_out_of_range", _set("col_indices", 3, 8), "col_indices"),
    ("col_unsorted", _swap_first_two_cols, "col_indices"),
    ("col_duplicate", _edit("col_indices", lambda t: torch.cat([t[:1], t[:1], t[2:]])), "col_indices"),
    ("crow_float", _edit("crow_indices", lambda t: t.float()), "crow_indices"),
    ("col_float", _edit("col_indices", lambda t: t.double()), "col_indices"),
    ("crow_2d", _edit("crow_indices", lambda t: t.unsqueeze(0)), "crow_indices"),
    ("col_2d", _edit("col_indices", lambda t: t.reshape(4, -1)), "col_indices"),
    ("blocks_wrong_nnzb", _edit("blocks", lambda t: t[:-1]), "blocks"),
    ("blocks_wrong_block", _edit("blocks", lambda t: t[:, :4, :4]), "blocks"),
    ("blocks_missing", lambda sd: {k: v for k, v in sd.items() if k != "blocks"}, "blocks"),
]


@pytest.mark.parametrize("corrupt,match", [c[1:] for c in SD_CORRUPTIONS], ids=[c[0] for c in SD_CORRUPTIONS])
def test_tampered_state_dict_raises_and_leaves_mapping_unchanged(corrupt, match):
    mapping = _mapping()
    before = _snapshot(mapping)
    matrix_before = mapping.matrix().clone()
    y_before, dx_before = _run(mapping)
    sd = corrupt(_sd(mapping))
    with pytest.raises(ValueError, match=match):
        mapping.load_state_dict(sd)
    after = _snapshot(mapping)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name], before[name]), name
    assert torch.equal(mapping.matrix(), matrix_before)
    y_after, dx_after = _run(mapping)
    assert torch.equal(y_after, y_before)
    assert torch.equal(dx_after, dx_before)


def test_failed_load_without_blocks_leaves_mapping_unchanged():
    # Regression: the layout used to be installed before torch reported the missing key,
    # leaving a new layout with the old blocks (nnzb mismatch).
    mapping = _mapping(seed=0, density=0.5)
    donor = _mapping(seed=1, density=0.25)
    sd = {k: v for k, v in _sd(donor).items() if k != "blocks"}
    before = _snapshot(mapping)
    for strict in (True, False):
        with pytest.raises((ValueError, RuntimeError), match="blocks"):
            mapping.load_state_dict(sd, strict=strict)
        for name, t in before.items():
            assert torch.equal(getattr(mapping, name), t), name
    assert mapping.blocks.shape[0] == mapping.layout.nnzb


def test_load_into_parametrized_mapping_with_other_nnzb_raises():
    mapping = M.block_orthogonal(64, 8, seed=0, learnable=True)  # 8 blocks
    before = mapping.matrix().detach().clone()
    sd = _sd(_mapping(seed=1, density=0.5))  # a valid layout with 32 blocks
    with pytest.raises(ValueError, match="blocks"):
        mapping.load_state_dict(sd, strict=False)
    assert torch.equal(mapping.matrix(), before)
    assert mapping.layout == M.block_orthogonal(64, 8).layout


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("src_density,dst_density", [(0.25, 0.5), (0.75, 0.25), (0.5, 0.5)])
def test_load_other_seed_and_density(src_density, dst_density, learnable):
    src = _mapping(seed=11, density=src_density, learnable=learnable)
    dst = _mapping(seed=3, density=dst_density, learnable=learnable)
    assert not torch.equal(src.matrix(), dst.matrix())
    dst.load_state_dict(_sd(src))
    assert dst.layout == src.layout
    for a, b in zip(dst.layout.tensors(), src.layout.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(dst.blocks, src.blocks)
    assert isinstance(dst.blocks, torch.nn.Parameter) == learnable
    assert dst.density == pytest.approx(src.density)
    assert torch.equal(dst.matrix(), src.matrix())
    y_src, dx_src = _run(src)
    y_dst, dx_dst = _run(dst)
    assert torch.equal(y_dst, y_src)
    assert torch.equal(dx_dst, dx_src)  # backward uses the transposed cache: it was rebuilt


def test_learnable_mapping_trains_after_loading_other_density():
    src = _mapping(seed=11, density=0.25, learnable=True)
    dst = _mapping(seed=3, density=0.75, learnable=True)
    dst.load_state_dict(_sd(src))
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    before = dst.blocks.detach().clone()
    y, _ = _run(dst)
    x = torch.randn(5, 64, generator=_gen(5))
    loss = entskip.skip_add(x, dst, None, 0.5).square().sum()
    opt.zero_grad()
    loss.backward()
    assert dst.blocks.grad.shape == before.shape
    opt.step()
    assert not torch.equal(dst.blocks.detach(), before)


def test_to_float64_and_state_dict_round_trip():
    m = _mapping(seed=2)
    m64 = _mapping(seed=2).to(torch.float64)
    assert m64.blocks.dtype == torch.float64
    for t in m64.layout.tensors():
        assert t.dtype == torch.int64
    assert torch.equal(m64.matrix(), m.matrix().double())

    fresh = _mapping(seed=9, density=0.25).to(torch.float64)
    fresh.load_state_dict(_sd(m64))
    assert fresh.blocks.dtype == torch.float64
    assert torch.equal(fresh.matrix(), m64.matrix())
    x = torch.randn(4, 64, dtype=torch.float64, generator=_gen(1))
    assert torch.equal(entskip.skip_add(x, fresh, None, 0.9), entskip.skip_add(x, m64, None, 0.9))

    # A float64 state_dict loads into a float32 mapping (cast on copy).
    m32 = _mapping(seed=9, density=0.75)
    m32.load_state_dict(_sd(m64))
    assert m32.blocks.dtype == torch.float32
    assert torch.equal(m32.matrix(), m64.matrix().float())
    # The saved state is only the CSR fields and the blocks: the transpose is derived.
    assert set(m64.state_dict()) == {"crow_indices", "col_indices", "blocks"}
