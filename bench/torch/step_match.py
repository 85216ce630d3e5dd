#!/usr/bin/env python3
"""PyTorch side of the step-by-step training check of nn-core's CIFAR-10 ResNet-20.

`crates/nn-core/examples/step_match.rs` trains nn-core's ResNet-20 (shortcut option A, seed 0)
for K steps through nn-core's real Trainer on the first K*128 CIFAR-10 training images in file
order (no augmentation, no shuffling; pixels / 255, then nn-core's per-channel normalisation),
with SGD (Nesterov momentum 0.9, constant lr 0.1, weight decay 5e-4 on all parameters) and
BatchNorm in training mode, and writes its initial and final state and per-step losses. This
script:

1. loads `OUT/initial.safetensors` into the ResNet-20 of `train_resnet20.py` (names mapped as in
   `eval_resnet20_checkpoint.py`: `layerS.B.x` -> `layers.(3(S-1)+B).x`);
2. reads the same images the same way, in float32 (`u8 * float32(1/255)`, then
   `(x - mean) * float32(1/std)`, the exact float operations of nn-core's pipeline), and checks
   them bit for bit against nn-core's first batch and per-step input digests;
3. runs the same K steps with `F.cross_entropy` (mean) and
   `torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)` (PyTorch BatchNorm:
   momentum 0.1, eps 1e-5, unbiased running variance), one thread;
4. prints the per-step losses side by side with nn-core's (first `--print-first` steps and every
   `--print-every`-th), and per-tensor differences after step K between nn-core's
   `OUT/checkpoint.safetensors` and PyTorch: weights, BatchNorm running mean/var and SGD momentum
   buffers; `rel` is ||a - b|| / ||b||, `rel_move` is the same difference relative to how far
   the tensor moved from its initial value, `norm_ratio` is ||nn-core|| / ||PyTorch|| - 1 (a
   systematic scale error, e.g. a wrong weight decay, shows there);
5. with `--f64-reference`, also runs PyTorch in float64 from the same start and prints the
   float32-vs-float64 differences of PyTorch itself: the size of pure rounding drift;
6. with `--replay` (needs `--snapshot-every N` on the Rust side), starts PyTorch from nn-core's
   own state (weights, BatchNorm statistics, momentum buffers) after steps 0, N, 2N, ..., makes
   one step and compares the change of every tensor with nn-core's change over the same step:
   a formula difference shows there at any point of training, without chaotic drift.

Usage (from the workspace root):
    RAYON_NUM_THREADS=1 nice -n 10 cargo run --release -p nn-core --example step_match -- \
        --steps 200 --snapshot-every 20 --out target/step_match/k200
    python3 bench/torch/step_match.py target/step_match/k200 --replay --f64-reference

Writes OUT/torch_steps.json (per-step PyTorch losses) next to nn-core's files. K=200 with both
options took about 10 minutes on one core of a busy 2-core machine (the Rust side about 4).

Reading the output: at lr 0.1 the trajectory is chaotic, so float32 rounding alone makes two
runs drift apart within ~10 steps (compare with the `torch f32 vs torch f64` lines); the free
run therefore checks agreement in distribution (loss level, tensor norms), and the replay checks
each single step: there nn-core's error against float64 should be the size of PyTorch float32's.
"""
import argparse, hashlib, json, math, os, sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_resnet20 import ResNet20  # noqa: E402

MOMENTUM_SUFFIX = ".momentum_buffer"


def torch_name(k):
    """nn-core variable name -> PyTorch state_dict key."""
    if k.startswith("layer"):
        stage, block, rest = k.split(".", 2)
        return f"layers.{(int(stage[5:]) - 1) * 3 + int(block)}.{rest}"
    return k


def load_state(path):
    """(model tensors, momentum buffers), both keyed by PyTorch names, from an nn-core
    VarStore file (plain names) or trainer checkpoint (`model/...`, `optim/...`)."""
    model, mom = {}, {}
    for k, v in load_file(path).items():
        if k.startswith("optim/"):
            name = k[len("optim/"):]
            if not name.endswith(MOMENTUM_SUFFIX):
                sys.exit(f"{path}: unexpected optimizer state `{k}`")
            mom[torch_name(name[: -len(MOMENTUM_SUFFIX)])] = v
        else:
            model[torch_name(k[len("model/"):] if k.startswith("model/") else k)] = v
    return model, mom


def build(model_state, mom, dtype, a):
    m = ResNet20(3, 10)
    missing, unexpected = m.load_state_dict(model_state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        sys.exit(f"state does not fit the PyTorch ResNet-20: missing {missing}, unexpected {unexpected}")
    m = m.to(dtype).train()
    opt = torch.optim.SGD(m.parameters(), lr=a["lr"], momentum=a["momentum"], nesterov=a["nesterov"], weight_decay=a["weight_decay"])
    params = dict(m.named_parameters())
    for k, v in mom.items():
        opt.state[params[k]]["momentum_buffer"] = v.to(dtype).clone()
    return m, opt


def read_images(d, n, mean, std):
    """The first n training images in file order, normalised with nn-core's float32 ops."""
    raw = np.concatenate([np.fromfile(os.path.join(d, f"data_batch_{i}.bin"), dtype=np.uint8).reshape(-1, 3073) for i in range(1, 6)])
    if n > len(raw):
        sys.exit(f"{n} images requested, the training files hold {len(raw)}")
    raw = raw[:n]
    x = raw[:, 1:].reshape(n, 3, 32, 32).astype(np.float32) * (np.float32(1.0) / np.float32(255.0))
    m = np.array(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    inv = (np.float32(1.0) / np.array(std, dtype=np.float32)).reshape(1, 3, 1, 1)
    x = (x - m) * inv
    assert x.dtype == np.float32
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(raw[:, 0].astype(np.int64))


def sha(t, dt):
    return hashlib.sha256(np.ascontiguousarray(t.numpy().astype(dt)).tobytes()).hexdigest()


def step(model, opt, x, y):
    """One training step; returns (loss, top-1 %, global gradient norm before weight decay)."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None))
    opt.step()
    return loss.item(), 100.0 * (out.argmax(1) == y).double().mean().item(), gn


def state_of(model, opt):
    """Model tensors (parameters and BatchNorm statistics) and momentum buffers, float64 copies."""
    s = {k: v.detach().double().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    params = dict(model.named_parameters())
    mom = {k: opt.state[p]["momentum_buffer"].detach().double().clone() for k, p in params.items() if "momentum_buffer" in opt.state[p]}
    return s, mom


def kind(k):
    if k.endswith("running_mean"):
        return "bn running_mean"
    if k.endswith("running_var"):
        return "bn running_var"
    if k.startswith("fc."):
        return "fc " + k.split(".")[-1]
    if ".bn" in k or k.startswith("bn"):
        return "bn " + k.split(".")[-1]
    return "conv weight"


def compare(a, b, init=None):
    """Per-tensor rows (name, rel, rel_move, max_abs, norm_ratio) of a (nn-core) vs b (reference)."""
    rows = []
    for k in sorted(b):
        if k not in a:
            sys.exit(f"`{k}` is missing on one side")
        x, y = a[k].double(), b[k].double()
        d = (x - y).norm().item()
        ny = y.norm().item()
        rel = d / ny if ny > 0 else d
        rm = float("nan")
        if init is not None and k in init:
            mv = (y - init[k].double()).norm().item()
            rm = d / mv if mv > 0 else float("nan")
        rows.append((k, rel, rm, (x - y).abs().max().item(), x.norm().item() / ny - 1 if ny > 0 else 0.0))
    return rows


def summarize(title, rows, show_all=False):
    print(f"\n{title}")
    groups = {}
    for r in rows:
        groups.setdefault(kind(r[0]), []).append(r)
    print(f"  {'kind':<18}{'tensors':>8}{'max rel':>12}{'max rel_move':>14}{'max |diff|':>12}{'mean norm_ratio':>17}  worst tensor")
    for g, rs in sorted(groups.items()):
        w = max(rs, key=lambda r: r[1])
        rms = [r[2] for r in rs if not math.isnan(r[2])]
        print(f"  {g:<18}{len(rs):>8}{w[1]:>12.3e}{(max(rms) if rms else float('nan')):>14.3e}{max(r[3] for r in rs):>12.3e}"
              f"{sum(r[4] for r in rs) / len(rs):>+17.2e}  {w[0]}")
    if show_all:
        print(f"  {'tensor':<30}{'rel':>11}{'rel_move':>11}{'max |diff|':>12}{'norm_ratio':>12}")
        for r in rows:
            print(f"  {r[0]:<30}{r[1]:>11.3e}{r[2]:>11.3e}{r[3]:>12.3e}{r[4]:>+12.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the --out directory of the Rust example")
    ap.add_argument("--cifar10", help="cifar-10-batches-bin directory (default: the one nn-core used)")
    ap.add_argument("--print-first", type=int, default=10)
    ap.add_argument("--print-every", type=int, default=20)
    ap.add_argument("--all-tensors", action="store_true", help="print every tensor, not only per-kind maxima")
    ap.add_argument("--f64-reference", action="store_true", help="also run PyTorch in float64 (rounding-drift reference)")
    ap.add_argument("--replay", action="store_true", help="replay single steps from nn-core's snapshots")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rs = json.load(open(os.path.join(a.out, "steps.json")))
    K, B = rs["steps"], rs["batch_size"]
    recs = rs["records"]
    hp = {k: rs[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    print(f"PyTorch {torch.__version__}, {a.threads} thread(s); nn-core run: {K} steps, batch {B}, {hp}")
    X, Y = read_images(a.cifar10 or rs["dataset_dir"], K * B, rs["normalize_mean"], rs["normalize_std"])

    # inputs: bit-exact against nn-core's first batch and per-step digests
    b0 = load_file(os.path.join(a.out, "batch0.safetensors"))
    d0 = (b0["images"] - X[:B]).abs().max().item()
    same_labels = torch.equal(b0["labels"], Y[:B])
    bad = [s + 1 for s in range(K)
           if sha(X[s * B:(s + 1) * B], "<f4") != recs[s]["input_sha256"] or sha(Y[s * B:(s + 1) * B], "<u4") != recs[s]["labels_sha256"]]
    print(f"inputs: batch 0 max |diff| {d0:.3e}, labels equal {same_labels}; "
          f"per-step digests {'all equal' if not bad else 'DIFFER at steps ' + str(bad[:10])}")

    init, _ = load_state(os.path.join(a.out, "initial.safetensors"))
    runs = {"f32": torch.float32}
    if a.f64_reference:
        runs["f64"] = torch.float64
    res = {}
    for tag, dt in runs.items():
        m, opt = build(init, {}, dt, hp)
        hist = []
        for s in range(K):
            hist.append(step(m, opt, X[s * B:(s + 1) * B].to(dt), Y[s * B:(s + 1) * B]))
        res[tag] = (hist, *state_of(m, opt))

    t32 = res["f32"][0]
    t64 = res["f64"][0] if a.f64_reference else None
    print("\nper-step training loss (batch mean, before the update), top-1 % of the batch, gradient norm")
    hdr = f"{'step':>5} {'nn-core':>10} {'torch f32':>10} {'diff':>10}"
    if t64:
        hdr += f" {'torch f64':>10} {'f32-f64':>10}"
    hdr += f" {'top1 nn/pt':>12} {'|g| nn-core':>12} {'|g| torch':>10}"
    print(hdr)
    for s in range(K):
        if not (s < a.print_first or (s + 1) % a.print_every == 0 or s == K - 1):
            continue
        r = recs[s]
        line = f"{s + 1:>5} {r['loss']:>10.6f} {t32[s][0]:>10.6f} {r['loss'] - t32[s][0]:>+10.2e}"
        if t64:
            line += f" {t64[s][0]:>10.6f} {t32[s][0] - t64[s][0]:>+10.2e}"
        line += f" {r['top1']:>5.1f}/{t32[s][1]:<5.1f} {r['grad_norm']:>12.5f} {t32[s][2]:>10.5f}"
        print(line)
    dl = [abs(recs[s]["loss"] - t32[s][0]) for s in range(K)]
    print(f"max |loss diff| nn-core vs torch f32: steps 1-10 {max(dl[:10]):.2e}, all steps {max(dl):.2e}; "
          f"mean loss nn-core {np.mean([r['loss'] for r in recs]):.5f}, torch {np.mean([h[0] for h in t32]):.5f}")
    if t64:
        d64 = [abs(t32[s][0] - t64[s][0]) for s in range(K)]
        print(f"max |loss diff| torch f32 vs torch f64:  steps 1-10 {max(d64[:10]):.2e}, all steps {max(d64):.2e}")

    fin, fmom = load_state(os.path.join(a.out, "checkpoint.safetensors"))
    init64 = {k: v.double() for k, v in init.items()}
    summarize(f"after step {K}: nn-core vs torch f32, model tensors", compare(fin, res["f32"][1], init64), a.all_tensors)
    summarize(f"after step {K}: nn-core vs torch f32, SGD momentum buffers", compare(fmom, res["f32"][2]), a.all_tensors)
    if a.f64_reference:
        summarize(f"after step {K}: torch f32 vs torch f64 (rounding drift alone), model tensors",
                  compare(res["f32"][1], res["f64"][1], init64))
        summarize(f"after step {K}: torch f32 vs torch f64, SGD momentum buffers", compare(res["f32"][2], res["f64"][2]))
        summarize(f"after step {K}: nn-core vs torch f64, model tensors", compare(fin, res["f64"][1], init64))

    if a.replay:
        snaps = sorted(int(f[6:10]) for f in os.listdir(a.out) if f.startswith("state_") and f.endswith(".safetensors"))
        pairs = [s for s in [0] + snaps if s + 1 in snaps]
        if not pairs:
            print("\n--replay: no state_SSSS.safetensors pairs (run the Rust side with --snapshot-every N)")
        print("\nreplay: one PyTorch step from nn-core's own state after step s, compared with nn-core's step s+1;")
        print("  per tensor rel = ||change a - change b|| / ||change b|| (momentum buffers: ||a - b|| / ||b||), max over each kind;")
        print("  `pt32 vs pt64` is PyTorch float32 against PyTorch float64 from the same state: the rounding-noise floor")
        kinds = ["conv weight", "bn weight", "bn bias", "fc weight", "fc bias", "bn running_mean", "bn running_var", "momentum"]
        print(f"  {'s':>4} {'compare':<15} {'loss a - b':>10} " + " ".join(f"{k[:12]:>12}" for k in kinds))
        table = []
        for s in pairs:
            p0, m0 = load_state(os.path.join(a.out, "initial.safetensors" if s == 0 else f"state_{s:04d}.safetensors"))
            p1, m1 = load_state(os.path.join(a.out, f"state_{s + 1:04d}.safetensors"))
            x, y = X[s * B:(s + 1) * B], Y[s * B:(s + 1) * B]
            after = {"nn-core": (recs[s]["loss"], {k: v.double() for k, v in p1.items()}, {k: v.double() for k, v in m1.items()})}
            for tag, dt in (("pt32", torch.float32), ("pt64", torch.float64)):
                m, opt = build(p0, m0, dt, hp)
                loss, _, _ = step(m, opt, x.to(dt), y)
                after[tag] = (loss, *state_of(m, opt))
            for ta, tb in (("nn-core", "pt32"), ("pt32", "pt64"), ("nn-core", "pt64")):
                (la, pa, ma), (lb, pb, mb) = after[ta], after[tb]
                worst = {k: 0.0 for k in kinds}
                for k in pb:
                    cb = pb[k] - p0[k].double()
                    d = ((pa[k] - p0[k].double()) - cb).norm().item()
                    n = cb.norm().item()
                    worst[kind(k)] = max(worst[kind(k)], d / n if n > 0 else d)
                for k in mb:
                    worst["momentum"] = max(worst["momentum"], (ma[k] - mb[k]).norm().item() / mb[k].norm().item())
                print(f"  {s:>4} {ta + ' vs ' + tb:<15} {la - lb:>+10.2e} " + " ".join(f"{worst[k]:>12.2e}" for k in kinds))
                table.append((s, ta + " vs " + tb, worst))
        if pairs:
            print(f"\nreplay summary over {len(pairs)} replayed steps: max over steps of each comparison, and the ratio")
            print("  (nn-core vs pt64) / (pt32 vs pt64): about 1 when nn-core rounds like PyTorch float32; a formula")
            print("  difference would give errors of order 1e-2 or more, far above float32 rounding")
            print(f"  {'':<26}" + " ".join(f"{k[:12]:>12}" for k in kinds))
            for c in ("nn-core vs pt32", "pt32 vs pt64", "nn-core vs pt64"):
                print(f"  {'max ' + c:<26}" + " ".join(f"{max(w[k] for _, cc, w in table if cc == c):>12.2e}" for k in kinds))
            for name, f in (("median ratio", np.median), ("max ratio", np.max)):
                vals = []
                for k in kinds:
                    r = [wa[k] / wb[k] for (sa, ca, wa), (sb, cb, wb) in zip(table[2::3], table[1::3]) if wb[k] > 0]
                    vals.append(f(r) if r else float("nan"))
                print(f"  {name + ' nn/pt32 error':<26}" + " ".join(f"{v:>12.2f}" for v in vals))

    with open(os.path.join(a.out, "torch_steps.json"), "w") as f:
        json.dump({"torch": torch.__version__, "steps": [{"step": s + 1, "loss": h[0], "top1": h[1], "grad_norm": h[2]} for s, h in enumerate(t32)],
                   "f64_steps": [{"step": s + 1, "loss": h[0]} for s, h in enumerate(t64)] if t64 else None}, f, indent=1)


if __name__ == "__main__":
    main()
