#!/usr/bin/env python3
"""Training/eval throughput of the PyTorch ResNet-20 reference on synthetic 1x28x28 batches,
with the same step as `cargo xtask bench train` (forward, cross-entropy, backward, SGD Nesterov
with weight decay). Prints one JSON line."""
import argparse, json, time

import torch
import torch.nn.functional as F

from train_resnet20 import ResNet20

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--batch-size", type=int, default=128)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
m = ResNet20(1, 10)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
x = torch.randn(a.batch_size, 1, 28, 28)
y = torch.arange(a.batch_size) % 10


def step():
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


m.train()
step()
t = time.time()
for _ in range(a.steps):
    step()
train = a.steps * a.batch_size / (time.time() - t)
m.eval()
with torch.no_grad():
    m(x)
    t = time.time()
    for _ in range(a.steps):
        m(x)
    ev = a.steps * a.batch_size / (time.time() - t)
print(json.dumps({"framework": f"pytorch {torch.__version__}", "train_images_per_s": train, "eval_images_per_s": ev, "threads": a.threads}))
