"""The main job: train a small CNN on scikit-learn's bundled digits (1,797 8×8
images, no download) with a plain Linear head and with each cnnboost module, print
accuracy and time per epoch for each, and plot the learning curves.

    python -m cnnboost.demo [--epochs 15] [--seed 0] [--variants baseline,ffc]
    python -m cnnboost.demo --data ~/cifar-10-batches-py      # CIFAR-10 (python version)
    python -m cnnboost.demo --data ~/my_images                # an ImageFolder tree (torchvision)
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


def load_folder(path: str, seed: int, size: int = 32):
    """A user's data set, split 80/20 like the digits: the CIFAR-10 python version
    (a folder with data_batch_1..5 and test_batch) or an ImageFolder tree (one
    sub-folder of images per class; needs torchvision), images resized to
    size×size, as float32 in [0, 1]."""
    import os
    import pickle

    import numpy as np

    if os.path.exists(os.path.join(path, "data_batch_1")):
        xs, ys = [], []
        for name in sorted(f for f in os.listdir(path) if f.startswith(("data_batch_", "test_batch"))):
            with open(os.path.join(path, name), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(batch[b"labels"])
        x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
        y = torch.tensor(ys, dtype=torch.long)
    elif os.path.isdir(path):
        try:
            from torchvision import datasets, transforms
        except ImportError as e:
            raise SystemExit(f"--data: reading an ImageFolder needs torchvision (pip install torchvision): {e}")
        tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
        ds = datasets.ImageFolder(path, transform=tf)
        if len(ds) < 2:
            raise SystemExit(f"--data: expected an ImageFolder with images, found {len(ds)} in {path}")
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        y = torch.tensor(ds.targets, dtype=torch.long)
    else:
        raise SystemExit(f"--data: expected a CIFAR-10 or ImageFolder directory, got {path!r}")
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
    """stem conv(32) → three conv(32) blocks → pool → conv(128) on 8×8 inputs, then a
    head on the [N, 128, 4, 4] map. `booster=True` puts an AB block in every conv
    block; `fuse=True` feeds the pool with AFI's fusion of the three block outputs
    instead of the last one."""

    def __init__(self, head: nn.Module, booster: bool = False, fuse: bool = False, in_channels: int = 1):
        super().__init__()
        self.stem = conv_bn(in_channels, 32, booster)
        self.blocks = nn.ModuleList(conv_bn(32, 32, booster) for _ in range(3))
        self.fuse = cnnboost.AFI(32) if fuse else None
        self.tail = nn.Sequential(nn.MaxPool2d(2), conv_bn(32, 128, booster))
        self.head = head

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for block in self.blocks:
            x = x + block(x)
            outs.append(x)
        x = self.fuse(outs) if self.fuse is not None else outs[-1]
        return self.head(self.tail(x))


class LinearHead(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def variants(in_channels: int = 1, classes: int = 10) -> Dict[str, Callable[[], nn.Module]]:
    """The models compared, by name: a plain Linear head, each module, all of them."""
    c, k = in_channels, classes
    return {
        "baseline": lambda: SmallCNN(LinearHead(128, k), in_channels=c),
        "ffc": lambda: SmallCNN(cnnboost.FFC(128, k), in_channels=c),
        "ssm": lambda: SmallCNN(cnnboost.SSM(128, k), in_channels=c),
        "ab": lambda: SmallCNN(LinearHead(128, k), booster=True, in_channels=c),
        "afi": lambda: SmallCNN(LinearHead(128, k), fuse=True, in_channels=c),
        "all": lambda: SmallCNN(cnnboost.FFC(128, k), booster=True, fuse=True, in_channels=c),
    }


VARIANTS = variants()


def run(name: str, make: Callable[[], nn.Module], data, epochs: int, seed: int, batch: int = 64,
        device: str = "cpu"):
    torch.manual_seed(seed)
    model = make().to(device)
    train_x, train_y, test_x, test_y = (t.to(device) for t in data)
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
    curve = []  # mean training loss per epoch
    for _ in epoch_iter:
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(len(train_x), device=train_x.device)
        total, batches = 0.0, 0
        for i in range(0, len(train_x), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            opt.zero_grad()
            loss = loss_fn(model(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        sched.step()
        if train_x.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        curve.append(total / max(batches, 1))
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    return acc, seconds / epochs, curve


def plot(curves: Dict[str, list], path: str) -> bool:
    """Writes the training-loss curves to a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("cnnboost demo: small CNN on scikit-learn digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--plot", default="cnnboost_demo.png", help="PNG of the learning curves ('' for none)")
    parser.add_argument("--data", default=None,
                        help="a CIFAR-10 (python version) or ImageFolder directory instead of the digits")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (on a GPU the modules compute with torch's ops, or with the CUDA build, "
                             "cnnboost-cuda, where it is installed: README, 'CUDA')")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        if not (args.device.startswith("cuda") and torch.cuda.is_available()):
            parser.error(f"--device: expected cpu, or cuda on a machine with a CUDA GPU, got {args.device!r}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    data = load_folder(args.data, args.seed) if args.data else load_digits(args.seed)
    models = variants(data[0].shape[1], int(max(data[1].max(), data[3].max())) + 1)
    print(f"{args.data or 'digits'}: {len(data[0])} train / {len(data[2])} test images "
          f"{tuple(data[0].shape[1:])}, {args.epochs} epochs, "
          f"{args.device if args.device != 'cpu' else f'{torch.get_num_threads()} threads'}, "
          f"cnnboost {cnnboost.__version__}")
    print(f"{'variant':<10} {'test acc':>9} {'s/epoch':>9}")
    curves = {}
    for v in names:
        acc, sec, curves[v] = run(v, models[v], data, args.epochs, args.seed, device=args.device)
        print(f"{v:<10} {acc:>9.4f} {sec:>9.3f}")
    if args.plot:
        if plot(curves, args.plot):
            print(f"learning curves: {args.plot}")
        else:
            print("learning curves: not plotted (pip install matplotlib)")


if __name__ == "__main__":
    main()
