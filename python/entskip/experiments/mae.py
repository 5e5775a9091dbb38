"""``mae``: Zhang et al.'s masked autoencoder with standard vs depth-decayed identity shortcuts.

Zhang et al. (2024) scale the identity path of encoder sub-layer ``l`` by ``alpha_l``,
falling linearly with depth (:func:`entskip.schedules.decayed`, one value per attention
and MLP sub-layer, 1.0 first and ``alpha_min`` last, encoder only), and report that MAE
features then get much better kNN and linear-probe accuracy, and that lower effective
rank of the features goes with better downstream accuracy.

The model follows their released code (github xiao7199/decayed_Identity_shortcuts,
``MAE/models_mae.py``) at a small scale:

- encoder: patch embedding, a class token, fixed 2-D sine-cosine position embeddings,
  ``depth`` pre-norm blocks (:class:`entskip.models.vit.Block`), no final norm;
- decoder: starts from its own (fixed) position embeddings, not from the encoder's
  tokens; the outputs of encoder blocks 2, 4, ..., ``depth`` enter the first decoder
  blocks, the last encoder block's output first, each through a :class:`SkipLayer`
  (``x + MLP([x, unshuffled encoder tokens])`` whose last layer starts at zero, masked
  positions filled with a learned token);
- every block's attention and MLP output projections and the prediction head start at
  zero, in **both** arms;
- ``alpha_min = 0.7`` (their ``--min_decay``); the loss is the mean squared error on
  the masked patches.

The ablation ``*_no_skips`` removes the decoder skips: the decoder then reads the
encoder's last-block tokens (mask tokens at the masked positions, plus its position
embeddings), as in He et al.'s MAE.

Data: the generated cluttered digits of :mod:`entskip.experiments.images` (16x16, 4x4
patches: 16 tokens, 75 % masked), pretrained without labels on the training split.
Read-out as in the released code: the last block's output, no final norm, mean-pooled
over the patch tokens, by kNN and a linear probe; for every layer (embedding, then
each block) kNN, linear probe and :func:`entskip.analysis.effective_rank` (raw and
centred) of the test features. Raw pixels give a reference. Each seed's data and
initial weights are shared by the arms; results are paired differences with 95 %
t-intervals over the seeds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import entskip
from entskip import analysis, schedules
from entskip.models.vit import Block

from . import images
from .common import (
    Optim,
    Settings,
    bars,
    curves,
    environment,
    figure,
    intervals,
    paired,
    progress_bar,
    save_figure,
    seed_everything,
    summary,
    train,
    verdict,
)

EPOCHS = 10
SEEDS = 5
DEPTH = 6
ALPHA_MIN = 0.7
TRAIN_SIZE, TEST_SIZE = 2000, 1000
VARIANTS = ("standard", "decayed", "standard_no_skips", "decayed_no_skips")
CLAIM = (
    "MAE: decayed identity shortcuts raise kNN and linear-probe accuracy of the encoder's features; "
    "lower effective feature rank goes with better downstream accuracy"
)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed ``(1, 1 + grid^2, dim)`` 2-D sine-cosine position embeddings (row 0, the class
    token's, is zero): half the channels encode the row, half the column, each as
    ``sin``/``cos`` of the position at ``dim / 4`` frequencies ``10000^(-i / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    freq = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None] * freq[None, :]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).unsqueeze(0).float()


def _unshuffle(tokens: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """``(N, 1 + keep, C)`` class + visible tokens -> ``(N, 1 + T, C)`` in patch order, masked
    positions filled with ``mask_token (1, 1, C)``."""
    n, t = ids_restore.shape
    filler = mask_token.expand(n, t + 1 - tokens.shape[1], -1)
    patches = torch.cat([tokens[:, 1:], filler], dim=1)
    patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], dim=1)


class SkipLayer(nn.Module):
    """An encoder-to-decoder skip: ``x + fc2(silu(fc1([x, unshuffled encoder tokens])))``.

    ``fc2`` starts at zero, so the skip starts as the identity on the decoder stream.
    Shapes: ``x (N, 1 + T, decoder_dim)``, ``encoded (N, 1 + keep, dim)``,
    ``ids_restore (N, T)`` -> ``(N, 1 + T, decoder_dim)``.
    """

    def __init__(self, decoder_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim + decoder_dim, decoder_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(decoder_dim, decoder_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, x: Tensor, encoded: Tensor, ids_restore: Tensor) -> Tensor:
        full = _unshuffle(encoded, self.mask_token, ids_restore)
        return x + self.fc2(self.act(self.fc1(torch.cat([x, full], dim=-1))))


def _zero_branch_outputs(blocks) -> None:
    for block in blocks:
        for layer in (block.attn.proj, block.mlp.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


class MaskedAutoencoder(nn.Module):
    """Zhang et al.'s MAE (module docstring) on ``(N, C, H, W)`` images.

    Shapes: ``images (N, C, H, W)`` -> ``forward``: scalar loss; :meth:`features`:
    ``[(N, dim)]`` per layer (embedding, then each block), mean-pooled over the patches.
    """

    def __init__(
        self,
        image_size: int = images.SIZE,
        patch_size: int = 4,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = DEPTH,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        decoder_dim: int = 32,
        decoder_depth: int = 3,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        decoder_skips: bool = True,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if decoder_skips and depth // 2 > decoder_depth:
            raise ValueError(f"{depth // 2} decoder skips need decoder_depth >= {depth // 2}, got {decoder_depth}")
        self.patch_size, self.mask_ratio, self.decoder_skips = patch_size, mask_ratio, decoder_skips
        grid = image_size // patch_size
        patch_dim = in_channels * patch_size**2
        self.embed = nn.Linear(patch_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos_embed", sincos_2d(dim, grid))
        self.encoder = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.skip_ids = list(range(1, depth, 2))  # encoder blocks 2, 4, ... (0-based 1, 3, ...)
        self.skips = nn.ModuleList(SkipLayer(decoder_dim, dim) for _ in self.skip_ids) if decoder_skips else None
        self.decoder_cls_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.register_buffer("decoder_pos", sincos_2d(decoder_dim, grid))
        if decoder_skips:
            self.decoder_embed = nn.Linear(decoder_dim, decoder_dim)
        else:
            self.decoder_embed = nn.Linear(dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.decoder = nn.Sequential(*(Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, patch_dim)
        _zero_branch_outputs([*self.encoder, *self.decoder])
        nn.init.zeros_(self.predict.weight)
        nn.init.zeros_(self.predict.bias)

    def patchify(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, T, C * p * p)`` patches in row-major order."""
        n, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def _tokens(self, patches: Tensor) -> Tensor:
        return self.embed(patches) + self.pos_embed[:, 1:]

    def _with_cls(self, tokens: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patchify(images)
        n, t, _ = patches.shape
        keep = max(1, int(t * (1 - self.mask_ratio)))
        ids_shuffle = torch.rand(n, t, device=images.device).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        tokens = self._tokens(patches)
        x = self._with_cls(tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, tokens.shape[-1])))
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i in self.skip_ids:
                skips.append(x)
        if self.decoder_skips:
            start = torch.cat([self.decoder_cls_token, self.decoder_pos[:, 1:]], dim=1).expand(n, -1, -1)
            y = self.decoder_embed(start)
            for i, block in enumerate(self.decoder):
                if skips:
                    y = self.skips[i](y, skips.pop(), ids_restore)
                y = block(y)
        else:
            y = self.decoder_embed(_unshuffle(x, self.mask_token, ids_restore)) + self.decoder_pos
            y = self.decoder(y)
        pred = self.predict(self.decoder_norm(y))[:, 1:]
        masked = torch.ones(n, t, device=images.device)
        masked[:, :keep] = 0
        masked = masked.gather(1, ids_restore)
        return (((pred - patches) ** 2).mean(dim=-1) * masked).sum() / masked.sum()

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """``[embedding, block 1, ..., block depth]`` of the unmasked images, each the
        layer's patch tokens (class token excluded) averaged: ``(N, dim)``. The last is
        the read-out feature (no final norm, as in the released code)."""
        x = self._with_cls(self._tokens(self.patchify(images)))
        layers = [x[:, 1:].mean(dim=1)]
        for block in self.encoder:
            x = block(x)
            layers.append(x[:, 1:].mean(dim=1))
        return layers


def build(variant: str) -> MaskedAutoencoder:
    """A fresh MAE of a :data:`VARIANTS` entry; ``decayed*`` converts the encoder's skips with
    :func:`entskip.entangle` (``alpha_min = ALPHA_MIN``, one value per sub-layer)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    model = MaskedAutoencoder(decoder_skips=not variant.endswith("_no_skips"))
    if variant.startswith("decayed"):
        entskip.entangle(model.encoder, "identity", "decay", alpha_min=ALPHA_MIN, zero_init_branch=True)
    return model


def _reconstruction(model: nn.Module, batch: tuple[Tensor]) -> Tensor:
    return model(batch[0])


def _readouts(model: MaskedAutoencoder, data: dict[str, Tensor]) -> dict:
    """kNN / linear probe of the last layer and of every layer, and each layer's effective rank."""
    train_layers, test_layers = model.features(data["x_train"]), model.features(data["x_test"])
    ytr, yte = data["y_train"], data["y_test"]
    layer_knn = [analysis.knn_accuracy(a, ytr, b, yte) for a, b in zip(train_layers, test_layers)]
    layer_lin = [analysis.linear_probe(a, ytr, b, yte) for a, b in zip(train_layers, test_layers)]
    return {
        "knn": layer_knn[-1],
        "linear_probe": layer_lin[-1],
        "layer_knn": layer_knn,
        "layer_linear_probe": layer_lin,
        "effective_rank": [analysis.effective_rank(f) for f in test_layers],
        "effective_rank_centered": [analysis.effective_rank(f, center=True) for f in test_layers],
    }


def _comparisons(per_seed: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """Paired differences (decayed - standard, with and without decoder skips; skips - no
    skips per arm) of kNN, linear probe and last-layer effective rank, and the verdicts."""
    pairs = {
        "decayed_minus_standard": ("decayed", "standard"),
        "decayed_minus_standard_no_skips": ("decayed_no_skips", "standard_no_skips"),
        "skips_minus_no_skips_standard": ("standard", "standard_no_skips"),
        "skips_minus_no_skips_decayed": ("decayed", "decayed_no_skips"),
    }
    deltas, verdicts = {}, []
    for name, (a, b) in pairs.items():
        if a not in per_seed or b not in per_seed:
            continue
        ra, rb = per_seed[a], per_seed[b]
        deltas[name] = {
            "knn": paired(x["knn"] - y["knn"] for x, y in zip(ra, rb)),
            "linear_probe": paired(x["linear_probe"] - y["linear_probe"] for x, y in zip(ra, rb)),
            "effective_rank": paired(x["effective_rank"][-1] - y["effective_rank"][-1] for x, y in zip(ra, rb)),
            "effective_rank_centered": paired(
                x["effective_rank_centered"][-1] - y["effective_rank_centered"][-1] for x, y in zip(ra, rb)
            ),
        }
        if name.startswith("decayed_minus"):
            for key, sign in (("knn", +1), ("linear_probe", +1), ("effective_rank", -1), ("effective_rank_centered", -1)):
                d = deltas[name][key]
                verdicts.append({"comparison": name, "metric": key, "expected_sign": sign, "mean": d["mean"],
                                 "ci95": d["ci95"], "verdict": verdict(d["ci95"], sign)})
    return deltas, verdicts


def run(settings: Settings) -> dict:
    """Pretrain every variant for every seed and read their features out."""
    epochs, seeds = settings.resolved(EPOCHS, SEEDS)
    optim = Optim(lr=1.5e-3, weight_decay=0.05, batch_size=128)
    per_seed: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    pixels = []
    with progress_bar(epochs * len(seeds) * len(VARIANTS), "mae", settings.progress) as pbar:
        for seed in seeds:
            data = images.load(seed, train_size=TRAIN_SIZE, test_size=TEST_SIZE, device=settings.device)
            flat = {k: v.flatten(1) if k.startswith("x") else v for k, v in data.items()}
            pixels.append(
                {
                    "knn": analysis.knn_accuracy(flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"]),
                    "linear_probe": analysis.linear_probe(flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"]),
                }
            )
            for variant in VARIANTS:
                generator = seed_everything(seed)
                model = build(variant).to(settings.device)
                history = train(
                    model, (data["x_train"],), _reconstruction, epochs=epochs, optim=optim, generator=generator,
                    max_steps=settings.max_steps, bar=pbar,
                )
                per_seed[variant].append({**_readouts(model, data), "history": history})
    results = {}
    for variant, runs in per_seed.items():
        results[variant] = {
            "knn": summary(r["knn"] for r in runs),
            "linear_probe": summary(r["linear_probe"] for r in runs),
            "final_loss": summary(r["history"]["loss"][-1] for r in runs),
            "layers": {
                key: [summary(r[key][layer] for r in runs) for layer in range(DEPTH + 1)]
                for key in ("layer_knn", "layer_linear_probe", "effective_rank", "effective_rank_centered")
            },
            "history": {"loss": [r["history"]["loss"] for r in runs]},
        }
    deltas, verdicts = _comparisons(per_seed)
    every = [r for runs in per_seed.values() for r in runs]
    rank = torch.tensor([r["effective_rank"][-1] for r in every], dtype=torch.float64)
    knn = torch.tensor([r["knn"] for r in every], dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([rank, knn]))[0, 1]) if len(every) > 2 else math.nan
    decayed_alphas = [float(m.alpha) for m in build("decayed").encoder.modules() if isinstance(m, entskip.EntangledSkip)]
    return {
        "claim": CLAIM,
        "setup": {
            "model": f"MaskedAutoencoder(image_size={images.SIZE}, patch_size=4, dim=64, depth={DEPTH}, num_heads=4, "
            "mlp_ratio=2, decoder_dim=32, decoder_depth=3, mask_ratio=0.75; decoder skips from encoder blocks 2, 4, 6)",
            "data": f"cluttered digits {images.SIZE}x{images.SIZE} (entskip.experiments.images): pretrain on the "
            f"{TRAIN_SIZE} training images without labels; probes {TRAIN_SIZE} train / {TEST_SIZE} test",
            "variants": list(VARIANTS),
            "decayed_alphas": decayed_alphas,
            "alpha_min": ALPHA_MIN,
            "effective_alpha": schedules.effective_alpha(decayed_alphas),
            "zero_init": "attn.proj, mlp.fc2 of every encoder and decoder block, the prediction head, SkipLayer.fc2: all variants",
            "features": "last encoder block's output, no final norm, mean over patch tokens",
            "optim": optim,
            "knn": "k=20, cosine, weights exp(sim/0.07)",
            "linear_probe": "standardised features, multinomial logistic regression, L-BFGS 100 iterations, L2 1e-4",
        },
        "environment": environment(settings, epochs, seeds),
        "baselines": {"pixels": {key: summary(p[key] for p in pixels) for key in ("knn", "linear_probe")}},
        "results": results,
        "paired": deltas,
        "rank_vs_knn_correlation": {"pearson_r": corr, "over": "every run's last-layer effective rank and kNN accuracy"},
        "verdicts": verdicts,
    }


def plot(results: dict, path) -> None:
    """Two rows: kNN and linear-probe accuracy (bars), the paired differences with their
    95 % intervals, pretraining loss; effective rank per layer (raw and centred), kNN
    and linear-probe accuracy per layer."""
    res = results["results"]
    fig, (top, bottom) = figure(2, 4)
    pixels = results["baselines"]["pixels"]
    for ax, key, label in ((top[0], "knn", "kNN (k=20)"), (top[1], "linear_probe", "linear probe")):
        bars(ax, {k: v[key] for k, v in res.items()}, f"{label} accuracy", f"last block: {label}", ("raw pixels", pixels[key]["mean"]))
    intervals(
        top[2], {f"{name.replace('_minus_', ' - ')}: {m}": d[m] for name, d in results["paired"].items() for m in ("knn", "linear_probe")},
        "accuracy difference", "paired differences, 95 % CI",
    )
    top[2].tick_params(axis="x", labelsize=6)
    curves(top[3], {k: v["history"]["loss"] for k, v in res.items()}, "masked MSE", "pretraining loss")
    for ax, key, label in (
        (bottom[0], "effective_rank", "effective rank"),
        (bottom[1], "effective_rank_centered", "effective rank (centred)"),
        (bottom[2], "layer_knn", "kNN accuracy"),
        (bottom[3], "layer_linear_probe", "linear-probe accuracy"),
    ):
        for variant, v in res.items():
            means = [s["mean"] for s in v["layers"][key]]
            lo = [min(s["values"]) for s in v["layers"][key]]
            hi = [max(s["values"]) for s in v["layers"][key]]
            layers = range(len(means))
            ax.plot(layers, means, marker="o", label=variant)
            ax.fill_between(layers, lo, hi, alpha=0.2)
        ax.set_xlabel("layer (0 = embedding)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per layer (test features)", fontsize=10)
        ax.legend(fontsize=7)
    save_figure(fig, path)
