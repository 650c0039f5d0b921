"""Train the embedded feature network (``digits``) on scikit-learn's 8x8 digits.

Fixed seed, CPU, a minute or two. A stratified 80/20 split (``random_state=0``) keeps 360
images held out; the held-out accuracy is printed and recorded in the metadata next to the
weights. Training uses random one-pixel shifts (background-padded) as augmentation.

    python scripts/train_digits_features.py                       # the shipped files
    python scripts/train_digits_features.py --out-dir /tmp/digits --epochs 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from searchd.evaluation.digits import FEATURE_DIM, N_CLASSES, DigitsCNN, digits_images

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "searchd" / "evaluation" / "data"


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image [B, 1, 8, 8] by -1, 0 or +1 pixel per axis, padding with -1."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (x.shape[0],), generator=g)
    dx = torch.randint(0, 3, (x.shape[0],), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(-1, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(-1, 8, 8)
    b = torch.arange(x.shape[0])[:, None, None].expand(-1, 8, 8)
    return padded[b, 0, rows, cols].unsqueeze(1)


def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        _, logits = net(x)
    return float((logits.argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x, y = digits_images()
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=0
    )
    xtr, ytr = torch.from_numpy(x[idx_train]), torch.from_numpy(y[idx_train])
    xte, yte = torch.from_numpy(x[idx_test]), torch.from_numpy(y[idx_test])

    net = DigitsCNN(FEATURE_DIM)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(ytr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(ytr), generator=g)
        total = 0.0
        for start in range(0, len(ytr), args.batch_size):
            b = perm[start : start + args.batch_size]
            xb = random_shift(xtr[b], g)
            _, logits = net(xb)
            loss = F.cross_entropy(logits, ytr[b], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if (epoch + 1) % 10 == 0 or epoch == args.epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  loss {total / len(ytr):.4f}  "
                f"held-out accuracy {accuracy(net, xte, yte):.4f}"
            )
    seconds = time.perf_counter() - t0
    test_acc = accuracy(net, xte, yte)
    train_acc = accuracy(net, xtr, ytr)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / "digits-cnn.pt"
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, weights)
    meta = {
        "name": "digits",
        "architecture": "DigitsCNN (searchd/evaluation/digits.py)",
        "feature_dim": FEATURE_DIM,
        "n_classes": N_CLASSES,
        "input": "images [B, 1, 8, 8], pixels 0..16 scaled to [-1, 1] (x / 8 - 1)",
        "heldout_accuracy": round(test_acc, 6),
        "train_accuracy": round(train_acc, 6),
        "n_train": int(len(ytr)),
        "n_heldout": int(len(yte)),
        "split": "sklearn train_test_split(test_size=0.2, stratify=y, random_state=0)",
        "seed": args.seed,
        "epochs": args.epochs,
        "train_seconds": round(seconds, 1),
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "script": "scripts/train_digits_features.py",
    }
    meta_path = args.out_dir / "digits-cnn.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"held-out accuracy {test_acc:.4f} ({len(yte)} images), train {train_acc:.4f}")
    print(f"wrote {weights} ({meta['weights_bytes']} bytes) and {meta_path} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
