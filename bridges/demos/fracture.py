"""Learn fracture permeability through a differentiable flow solver (seed 003, DPFEHM Fig. 2).

A synthetic rough fracture (seeded log-normal aperture) has a hidden "fine-scale truth"
permeability k_true = a^2/12 * c, where c < 1 is a roughness factor of the local aperture gradient
(bridges/fracture/_data.py). The fast solver starts from the local cubic law a^2/12 and multiplies
it by weights W = exp(net(aperture)), a small convolutional net of the aperture as in the paper
(W > 0 by construction; pressure is invariant to a global scale of k, so W is learned up to a
constant). The net is trained by Adam so that the solver's pressure matches the truth's, with
gradients through the bridged solve (one transposed solve each). Writes a 3-panel PNG: aperture,
learned W, pixel-wise relative pressure error.

    python -m bridges.demos.fracture [--backend petsc|torch|julia|dpfehm] [--grid 128]
                                     [--iterations 200] [--quick] [--out DIR]
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch

from bridges.fracture import BACKENDS, cubic_law, pressure, synthetic_fracture
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure


class WeightNet(torch.nn.Module):
    """W = exp(net(ln a)): three 3x3 convolutions (replicate padding), tanh, ~1.3k parameters."""

    def __init__(self, width=12):
        super().__init__()
        conv = lambda i, o, s: torch.nn.Conv2d(i, o, s, padding=s // 2,  # noqa: E731
                                               padding_mode="replicate", dtype=torch.float64)
        self.body = torch.nn.Sequential(conv(1, width, 3), torch.nn.Tanh(), conv(width, width, 3),
                                        torch.nn.Tanh(), conv(width, 1, 1))
        torch.nn.init.zeros_(self.body[-1].weight)
        torch.nn.init.zeros_(self.body[-1].bias)  # start exactly at the cubic law

    def forward(self, aperture):
        la = torch.log(aperture)
        x = ((la - la.mean()) / la.std())[None, None]
        return torch.exp(self.body(x)[0, 0])


def relative_error(p, target):
    return (p - target).abs() / target.abs()


class FractureModel(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.net, self.backend = WeightNet(), backend

    def forward(self, aperture):
        w = self.net(aperture)
        return pressure(cubic_law(aperture) * w, self.backend), w


def make_data(grid, samples, seed, backend):
    data = []
    for s in range(samples):
        f = synthetic_fracture(grid, seed=seed + s)
        with torch.no_grad():
            data.append((f, pressure(f.k_true, backend)))
    return data


def loss_of(model, data):
    total = 0.0
    for f, target in data:
        p, _ = model(f.aperture)
        total = total + torch.mean(relative_error(p, target) ** 2)
    return total / len(data)


def train(backend="petsc", grid=128, iterations=200, samples=2, lr=0.02, seed=0,
          show_progress=True):
    """Train on `samples` fractures, evaluate on one held-out fracture; returns a result dict."""
    torch.manual_seed(seed)
    model = FractureModel(backend)
    data = make_data(grid, samples, seed, backend)
    test = make_data(grid, 1, seed + 1000, backend)[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    bar = progress(range(iterations), desc=f"training ({backend}, {grid}x{grid})",
                   disable=not show_progress)
    for _ in bar:
        opt.zero_grad()
        loss = loss_of(model, data)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(rms_rel_err=f"{loss.item() ** 0.5:.2e}")
    return evaluate(model, data, test, history)


def evaluate(model, data, test, history):
    with torch.no_grad():
        f, target = test
        p, w = model(f.aperture)
        err = relative_error(p, target)
        base = relative_error(pressure(cubic_law(f.aperture), model.backend), target)
        train_err = [relative_error(model(g.aperture)[0], t).mean().item() for g, t in data]
    corr = np.corrcoef(w.numpy().ravel(), f.correction.numpy().ravel())[0, 1]
    return {"aperture": f.aperture.numpy(), "W": w.numpy(), "correction": f.correction.numpy(),
            "error": err.numpy(), "mean_error": err.mean().item(),
            "cubic_law_error": base.mean().item(), "train_error": float(np.mean(train_err)),
            "correlation": float(corr), "history": np.array(history)}


def train_lightning(backend, grid, iterations, samples, lr, seed):
    """The same training as a PyTorch Lightning module (the paper trained with Lightning)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    data = make_data(grid, samples, seed, backend)
    test = make_data(grid, 1, seed + 1000, backend)[0]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = FractureModel(backend)

        def training_step(self, batch, batch_idx):
            loss = loss_of(self.model, data)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=lr)

        def train_dataloader(self):
            return torch.utils.data.DataLoader([0] * iterations, batch_size=1)

    torch.manual_seed(seed)
    module = Module()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module)
    return evaluate(module.model, data, test, [])


def plot(result, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [(result["aperture"], "aperture a", "viridis"),
              (result["W"], f"learned W (corr. with hidden c: {result['correlation']:.2f})",
               "magma"),
              (100 * result["error"], f"relative pressure error [%] (mean "
                                      f"{100 * result['mean_error']:.3f}%)", "Reds")]
    for ax, (img, title, cmap) in zip(axes, panels):
        im = ax.imshow(img, origin="lower", cmap=cmap)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, out, "fracture.png", dpi=110)


def main(argv=None):
    parser = demo_parser(__doc__, quick="a 32x32 grid, 30 iterations, one fracture (smoke test)")
    parser.add_argument("--backend", default="petsc", choices=BACKENDS)
    parser.add_argument("--grid", type=int, default=128, help="cells per side")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2, help="training fractures")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lightning", choices=["auto", "off"], default="auto",
                        help="also train with PyTorch Lightning when it is installed")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.iterations, args.samples = 32, 30, 1
    if args.grid < 4 or args.iterations < 1 or args.samples < 1:
        parser.error("need --grid >= 4, --iterations >= 1, --samples >= 1")
    if args.backend in ("julia", "dpfehm"):
        from bridges.fracture import dpfehm_unavailable_reason
        from bridges.julia import julia_unavailable_reason
        reason = (julia_unavailable_reason() if args.backend == "julia"
                  else dpfehm_unavailable_reason())
        if reason is not None:
            parser.exit(2, f"--backend {args.backend} is unavailable: {reason}\n")

    start = time.perf_counter()
    result = train(args.backend, args.grid, args.iterations, args.samples, args.lr, args.seed)
    elapsed = time.perf_counter() - start
    print(f"\nheld-out fracture {args.grid}x{args.grid}: mean pixel-wise relative pressure error "
          f"{100 * result['mean_error']:.3f}% (cubic law alone: "
          f"{100 * result['cubic_law_error']:.3f}%; training fractures: "
          f"{100 * result['train_error']:.3f}%)")
    print(f"correlation of learned W with the hidden correction c: {result['correlation']:.3f}")
    print(f"{args.iterations} iterations x {args.samples} fractures in {elapsed:.1f} s "
          f"({args.backend})")
    if args.lightning == "auto":
        have = any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning"))
        if have:
            lit = train_lightning(args.backend, args.grid, args.iterations, args.samples, args.lr,
                                  args.seed)
            print(f"Lightning variant: mean relative error {100 * lit['mean_error']:.3f}%, "
                  f"correlation {lit['correlation']:.3f}")
        else:
            print("Lightning variant skipped: install lightning (pip install lightning)")
    report_figures(plot(result, args.out))


if __name__ == "__main__":
    main()
