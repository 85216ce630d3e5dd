#!/usr/bin/env python3
"""PyTorch CPU reference for nn-core's ResNet-20 training speed and accuracy.

Same model (CIFAR ResNet-20, shortcut option A), data (gzipped IDX files read directly, no
download), augmentation (random crop with 4-pixel zero padding + horizontal flip, per-dataset
normalisation), optimiser (SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, cosine per
iteration) and batch size (128) as `cargo xtask train --model resnet20 ...`.

Usage: python3 bench/torch/train_resnet20.py --data DIR --epochs N --threads 2 [--max-steps S] --out FILE.json
       python3 bench/torch/train_resnet20.py --cifar10 DIR/cifar-10-batches-bin --epochs N ...
(CIFAR-10 in the official binary layout: 3 channels, the per-channel normalisation of nn-core's
`cifar10`, a random crop position per image as in nn-core's loader.)
Prints one JSON object (also written to --out): images/s for training and evaluation, test top-1
per epoch and wall-clock times.
"""
import argparse, gzip, json, math, os, struct, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x
        if self.stride != 1 or self.extra:
            s = x[:, :, :: self.stride, :: self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + s)


class ResNet20(nn.Module):
    def __init__(self, cin, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, c = [], 16
        for i, w in enumerate([16, 32, 64]):
            for b in range(3):
                layers.append(Block(c, w, 2 if i > 0 and b == 0 else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz")
    ap.add_argument("--cifar10", help="folder with data_batch_{1..5}.bin and test_batch.bin (official binary layout)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many training steps (speed runs)")
    ap.add_argument("--mean", type=float, default=0.2860)
    ap.add_argument("--std", type=float, default=0.3530)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.cifar10:
        def load(names):
            raw = np.concatenate([np.fromfile(os.path.join(a.cifar10, n), dtype=np.uint8).reshape(-1, 3073) for n in names])
            return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255), torch.from_numpy(raw[:, 0].astype(np.int64))
        xtr, ytr = load([f"data_batch_{i}.bin" for i in range(1, 6)])
        xte, yte = load(["test_batch.bin"])
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
        # augmentation works on raw pixels (zero padding = black), normalisation afterwards
        norm = lambda t: (t - mean) / std
        xte = norm(xte)
    else:
        if not a.data:
            ap.error("--data or --cifar10 is required")
        xtr = torch.from_numpy(read_idx(os.path.join(a.data, "train-images-idx3-ubyte.gz")).copy()).float().div_(255).unsqueeze(1)
        ytr = torch.from_numpy(read_idx(os.path.join(a.data, "train-labels-idx1-ubyte.gz")).astype(np.int64))
        xte = torch.from_numpy(read_idx(os.path.join(a.data, "t10k-images-idx3-ubyte.gz")).copy()).float().div_(255).unsqueeze(1)
        yte = torch.from_numpy(read_idx(os.path.join(a.data, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))
        xtr, xte = (xtr - a.mean) / a.std, (xte - a.mean) / a.std
        norm = None
    model = ResNet20(xtr.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(xtr) // a.batch_size
    total = steps_per_epoch * a.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(a.seed)
    H = xtr.shape[2]
    log, step, t_start, train_time, train_imgs = [], 0, time.time(), 0.0, 0
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        t0 = time.time()
        for b in range(steps_per_epoch):
            idx = perm[b * a.batch_size : (b + 1) * a.batch_size]
            x = F.pad(xtr[idx], (4, 4, 4, 4))
            if norm is None:
                dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
                x = x[:, :, dy : dy + H, dx : dx + H]
            else:
                off = torch.randint(0, 9, (len(idx), 2), generator=g).tolist()
                x = torch.stack([x[i, :, dy : dy + H, dx : dx + H] for i, (dy, dx) in enumerate(off)])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if norm is not None:
                x = norm(x)
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            train_imgs += len(idx)
            if a.max_steps and step >= a.max_steps:
                break
        train_time += time.time() - t0
        model.eval()
        t1 = time.time()
        correct = 0
        with torch.no_grad():
            for b in range(0, len(xte), 500):
                correct += (model(xte[b : b + 500]).argmax(1) == yte[b : b + 500]).sum().item()
        eval_s = time.time() - t1
        log.append({"epoch": epoch + 1, "test_top1": 100.0 * correct / len(xte), "wall_s": time.time() - t_start, "eval_images_per_s": len(xte) / eval_s})
        print(json.dumps(log[-1]), flush=True)
        if a.max_steps and step >= a.max_steps:
            break
    res = {"framework": f"pytorch {torch.__version__}", "threads": a.threads, "train_images_per_s": train_imgs / train_time,
           "eval_images_per_s": log[-1]["eval_images_per_s"], "epochs": log, "steps": step, "wall_s": time.time() - t_start}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
