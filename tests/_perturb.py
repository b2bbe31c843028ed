"""Make every expert and router row of an upcycled model distinct, by index.

Freshly upcycled experts are identical copies (or whole virtual groups) and router rows repeat,
so a format that wrote experts or rows in the wrong order would still compare equal. Each expert
e of each layer gets (e + 1)·1e-2 times a seeded random matrix added, each router row likewise."""

import torch

from upcycle.runtime import MoELayer


@torch.no_grad()
def perturb_by_index(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        n = layer.config.num_experts
        scale = (torch.arange(n, dtype=torch.float32) + 1) * 1e-2
        for p in list(layer.experts.parameters()) + [layer.router.weight]:
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.add_(noise * scale.view(-1, *([1] * (p.dim() - 1))).to(p.dtype))
    return model
