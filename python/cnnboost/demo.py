"""The main job: train a small CNN on scikit-learn's bundled digits (1,797 8×8
images, no download) with a plain Linear head and with each cnnboost module, and
print accuracy and time per epoch for each.

    python -m cnnboost.demo [--epochs 15] [--seed 0] [--variants baseline,ffc]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import torch
from torch import nn

import cnnboost


def load_digits(seed: int):
    """(train_x, train_y, test_x, test_y): digits as [N, 1, 8, 8] float32 in [0, 1],
    a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def conv_bn(cin: int, cout: int, booster: bool = False) -> nn.Sequential:
    """conv 3×3 → BN (→ AB) → ReLU: AB recalibrates the normalised block output."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    if booster:
        layers.append(cnnboost.AB(cout))
    return nn.Sequential(*layers, nn.ReLU())


class SmallCNN(nn.Module):
    """conv(32) → conv(64) → pool → conv(128) on 8×8 inputs, then a head on the
    [N, 128, 4, 4] feature map; `booster=True` puts an AB block in every conv block."""

    def __init__(self, head: nn.Module, booster: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32, booster), conv_bn(32, 64, booster), nn.MaxPool2d(2), conv_bn(64, 128, booster)
        )
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


class LinearHead(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


VARIANTS: Dict[str, Callable[[], nn.Module]] = {
    "baseline": lambda: SmallCNN(LinearHead(128, 10)),
    "ffc": lambda: SmallCNN(cnnboost.FFC(128, 10)),
    "ab": lambda: SmallCNN(LinearHead(128, 10), booster=True),
}


def run(name: str, make: Callable[[], nn.Module], data, epochs: int, seed: int, batch: int = 64):
    torch.manual_seed(seed)
    model = make()
    train_x, train_y, test_x, test_y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None
    epoch_iter = range(epochs)
    if tqdm is not None:
        epoch_iter = tqdm(epoch_iter, desc=f"{name:>9}", leave=False)
    seconds = 0.0
    for _ in epoch_iter:
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(len(train_x))
        for i in range(0, len(train_x), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            opt.zero_grad()
            loss = loss_fn(model(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
        sched.step()
        seconds += time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    return acc, seconds / epochs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    cnnboost.set_num_threads(torch.get_num_threads())
    data = load_digits(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads, cnnboost {cnnboost.__version__}")
    print(f"{'variant':<10} {'test acc':>9} {'s/epoch':>9}")
    for v in names:
        acc, sec = run(v, VARIANTS[v], data, args.epochs, args.seed)
        print(f"{v:<10} {acc:>9.4f} {sec:>9.3f}")


if __name__ == "__main__":
    main()
