"""``mae``: a small masked autoencoder with standard vs depth-decayed identity shortcuts.

Zhang et al. (2024) scale the identity path of layer ``l`` by a factor ``alpha_l`` that
falls linearly with depth (:func:`entskip.schedules.decayed`, one value per attention
and MLP sub-layer, 1.0 first and ``alpha_min`` last, encoder only, branch output
projections zero-initialised) and report that MAE features then get much better kNN
and linear-probe accuracy, and that lower effective rank of the features goes with
better downstream accuracy.

Here an MAE (He et al. 2022) with a ViT encoder (:class:`entskip.models.vit.Block`,
width 64, 8 blocks, 4 heads, MLP ratio 2; no class token) and a 2-block decoder
(width 32) reconstructs the masked 2x2 patches of scikit-learn's 8x8 digits (16
patches, half of them masked; mean squared error on the masked pixels), pretrained
on the 1000 training images without labels. ``alpha_min`` is chosen so that the
product of the 16 encoder alphas matches the product of the paper's best ViT-B/16
setting (24 sub-layers at ``alpha_min = 0.6``), via
:func:`entskip.schedules.alpha_min_for`.

The encoder's features of the unmasked images, mean-pooled over the patches, are
then read out on the labelled split: the final (layer-normed) output by kNN and by
a linear probe, and every layer (the embedding, then each block's output) by kNN,
linear probe and :func:`entskip.analysis.effective_rank` (raw and centred) of the
test images' ``(797, 64)`` feature matrix. Raw pixels give a reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import entskip
from entskip import analysis, schedules
from entskip.models.vit import Block

from .common import (
    Optim,
    Settings,
    bars,
    curves,
    environment,
    figure,
    load_digits,
    progress_bar,
    save_figure,
    seed_everything,
    summary,
    train,
)

EPOCHS = 100
SEEDS = 3
DEPTH = 8
CLAIM = (
    "MAE: decayed identity shortcuts raise kNN and linear-probe accuracy of the encoder's features; "
    "lower effective feature rank goes with better downstream accuracy"
)


class MaskedAutoencoder(nn.Module):
    """A masked autoencoder on ``(N, C, H, W)`` images with entskip ViT blocks.

    Images are cut into ``patch_size x patch_size`` patches (``T`` of them), embedded
    linearly with learned position embeddings; a random ``mask_ratio`` of the patches
    is dropped per image, the encoder (``depth`` :class:`Block`\\ s, final layer norm)
    sees the rest, and the decoder (``decoder_depth`` blocks of width ``decoder_dim``)
    gets the encoded visible tokens with a learned mask token in place of each dropped
    one and predicts every patch's pixels. The loss is the mean squared error on the
    masked patches only.

    Shapes: ``images (N, C, H, W)`` -> ``forward``: scalar loss;
    :meth:`features`: list of ``(N, dim)`` per layer and the ``(N, dim)`` output.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = DEPTH,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        decoder_dim: int = 32,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.5,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        num_patches, patch_dim = (image_size // patch_size) ** 2, in_channels * patch_size**2
        self.embed = nn.Linear(patch_dim, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.encoder = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, num_patches, decoder_dim) * 0.02)
        self.decoder = nn.Sequential(*(Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, patch_dim)

    def patchify(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, T, C * p * p)`` patches in row-major order."""
        n, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patchify(images)
        n, t, _ = patches.shape
        keep = max(1, round(t * (1 - self.mask_ratio)))
        visible = torch.rand(n, t, device=images.device).argsort(dim=1)[:, :keep]
        tokens = self.embed(patches) + self.pos_embed
        encoded = self.norm(self.encoder(tokens.gather(1, visible[..., None].expand(-1, -1, tokens.shape[-1]))))
        dec = self.decoder_embed(encoded)
        full = self.mask_token.expand(n, t, dec.shape[-1]).scatter(1, visible[..., None].expand_as(dec), dec)
        pred = self.predict(self.decoder_norm(self.decoder(full + self.decoder_pos)))
        masked = torch.ones(n, t, device=images.device).scatter(1, visible, 0.0)
        return (((pred - patches) ** 2).mean(dim=-1) * masked).sum() / masked.sum()

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Mean-pooled encoder features of the unmasked images.

        Returns ``([embedding, block 1, ..., block depth], output)``: each ``(N, dim)``,
        the layers' raw token states averaged over the ``T`` patches, and the output
        (the last block's tokens through the final layer norm) averaged the same way.
        """
        x = self.embed(self.patchify(images)) + self.pos_embed
        layers = [x.mean(dim=1)]
        for block in self.encoder:
            x = block(x)
            layers.append(x.mean(dim=1))
        return layers, self.norm(x).mean(dim=1)


def alpha_min() -> float:
    """``alpha_min`` whose per-sub-layer decay over ``DEPTH`` blocks has the product of
    Zhang et al.'s best ViT-B/16 setting (12 blocks, ``alpha_min = 0.6``)."""
    target = schedules.effective_alpha(schedules.decayed(12, 0.6, per_sublayer=True))
    return schedules.alpha_min_for(DEPTH, target, per_sublayer=True)


def build(variant: str) -> MaskedAutoencoder:
    """A fresh MAE; ``"decayed"`` converts its encoder's skips with :func:`entskip.entangle`."""
    model = MaskedAutoencoder()
    if variant == "decayed":
        entskip.entangle(model.encoder, "identity", "decay", alpha_min=alpha_min(), zero_init_branch=True)
    elif variant != "standard":
        raise ValueError(f"unknown variant {variant!r}")
    return model


def _reconstruction(model: nn.Module, batch: tuple[Tensor]) -> Tensor:
    return model(batch[0])


def _readouts(model: MaskedAutoencoder, data: dict[str, Tensor]) -> dict:
    """kNN / linear probe of the output and of every layer, and each layer's effective rank."""
    train_layers, train_out = model.features(data["x_train"])
    test_layers, test_out = model.features(data["x_test"])
    labels = data["y_train"], data["y_test"]
    return {
        "knn": analysis.knn_accuracy(train_out, labels[0], test_out, labels[1]),
        "linear_probe": analysis.linear_probe(train_out, labels[0], test_out, labels[1]),
        "layer_knn": [analysis.knn_accuracy(a, labels[0], b, labels[1]) for a, b in zip(train_layers, test_layers)],
        "layer_linear_probe": [analysis.linear_probe(a, labels[0], b, labels[1]) for a, b in zip(train_layers, test_layers)],
        "effective_rank": [analysis.effective_rank(f) for f in test_layers],
        "effective_rank_centered": [analysis.effective_rank(f, center=True) for f in test_layers],
    }


def run(settings: Settings) -> dict:
    """Pretrain both variants for every seed and read their features out."""
    epochs, seeds = settings.resolved(EPOCHS, SEEDS)
    variants = ("standard", "decayed")
    optim = Optim(lr=1e-3, weight_decay=0.05, batch_size=128)
    per_seed: dict[str, list[dict]] = {v: [] for v in variants}
    pixels = []
    with progress_bar(epochs * len(seeds) * len(variants), "mae", settings.progress) as pbar:
        for seed in seeds:
            data = {k: v.to(settings.device) for k, v in load_digits(seed, train_size=1000).items()}
            flat = {k: v.flatten(1) if k.startswith("x") else v for k, v in data.items()}
            pixels.append(
                {
                    "knn": analysis.knn_accuracy(flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"]),
                    "linear_probe": analysis.linear_probe(flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"]),
                }
            )
            for variant in variants:
                generator = seed_everything(seed)
                model = build(variant).to(settings.device)
                history = train(
                    model,
                    (data["x_train"],),
                    _reconstruction,
                    epochs=epochs,
                    optim=optim,
                    generator=generator,
                    max_steps=settings.max_steps,
                    bar=pbar,
                )
                per_seed[variant].append({**_readouts(model, data), "history": history})
    results = {}
    for variant, runs in per_seed.items():
        results[variant] = {
            "knn": summary(r["knn"] for r in runs),
            "linear_probe": summary(r["linear_probe"] for r in runs),
            "layers": {
                key: [summary(r[key][layer] for r in runs) for layer in range(DEPTH + 1)]
                for key in ("layer_knn", "layer_linear_probe", "effective_rank", "effective_rank_centered")
            },
            "history": {"loss": [r["history"]["loss"] for r in runs]},
        }
    decayed_alphas = [float(m.alpha) for m in build("decayed").encoder.modules() if isinstance(m, entskip.EntangledSkip)]
    return {
        "claim": CLAIM,
        "setup": {
            "model": f"MaskedAutoencoder(image_size=8, patch_size=2, dim=64, depth={DEPTH}, num_heads=4, mlp_ratio=2, "
            "decoder_dim=32, decoder_depth=2, mask_ratio=0.5)",
            "data": "sklearn digits 8x8, pretrain on 1000 train images; probes: 1000 train / 797 test",
            "decayed_alphas": decayed_alphas,
            "alpha_min": alpha_min(),
            "effective_alpha": schedules.effective_alpha(decayed_alphas),
            "optim": optim,
            "knn": "k=20, cosine, weights exp(sim/0.07)",
            "linear_probe": "standardised features, multinomial logistic regression, L-BFGS 100 iterations, L2 1e-4",
        },
        "environment": environment(settings, epochs, seeds),
        "baselines": {"pixels": {key: summary(p[key] for p in pixels) for key in ("knn", "linear_probe")}},
        "results": results,
    }


def plot(results: dict, path) -> None:
    """Two rows: kNN and linear-probe accuracy (bars), pretraining loss; effective rank
    per layer (raw and centred) and kNN accuracy per layer."""
    res = results["results"]
    fig, (top, bottom) = figure(2, 3)
    pixels = results["baselines"]["pixels"]
    for ax, key, label in ((top[0], "knn", "kNN (k=20)"), (top[1], "linear_probe", "linear probe")):
        groups = {k: v[key] for k, v in res.items()}
        bars(ax, groups, f"{label} accuracy", f"encoder output: {label}", ("raw pixels", pixels[key]["mean"]))
    curves(top[2], {k: v["history"]["loss"] for k, v in res.items()}, "masked MSE", "pretraining loss")
    for ax, key, label in (
        (bottom[0], "effective_rank", "effective rank"),
        (bottom[1], "effective_rank_centered", "effective rank (centred)"),
        (bottom[2], "layer_knn", "kNN accuracy"),
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
        ax.set_title(f"{label} per layer (test features)")
        ax.legend(fontsize=8)
    save_figure(fig, path)
