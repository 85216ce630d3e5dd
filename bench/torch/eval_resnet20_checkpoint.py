#!/usr/bin/env python3
"""Evaluates an nn-core CIFAR-10 ResNet-20 checkpoint with PyTorch (cross-framework check).

Loads `checkpoint.safetensors` of a `cargo xtask train --model resnet20 --dataset cifar10` run
into the PyTorch ResNet-20 of train_resnet20.py (parameter names mapped: `model/layerS.B.x` ->
`layers.(3(S-1)+B).x`) and prints the test top-1 on the official CIFAR-10 test batch with
nn-core's normalisation. It should equal the run's own final test top-1.

Usage: python3 bench/torch/eval_resnet20_checkpoint.py RUN_DIR/checkpoint.safetensors \
           ../shared/datasets/cifar10/cifar-10-batches-bin
"""
import os, sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_resnet20 import ResNet20  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    state = {}
    for k, v in load_file(sys.argv[1]).items():
        if not k.startswith("model/"):
            continue
        k = k[len("model/"):]
        if k.startswith("layer"):
            stage, block, rest = k.split(".", 2)
            k = f"layers.{(int(stage[5:]) - 1) * 3 + int(block)}.{rest}"
        state[k] = v
    model = ResNet20(3, 10)
    model.load_state_dict(state, strict=True)
    model.eval()
    raw = np.fromfile(os.path.join(sys.argv[2], "test_batch.bin"), dtype=np.uint8).reshape(-1, 3073)
    y = torch.from_numpy(raw[:, 0].astype(np.int64))
    x = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    x = (x - mean) / std
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    print(f"PyTorch {torch.__version__}: test top-1 {100.0 * correct / len(x):.2f}% on {len(x)} images")


if __name__ == "__main__":
    main()
