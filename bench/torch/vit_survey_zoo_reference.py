"""Reference outputs and benchmarks for crates/vit-survey-zoo from timm.

  python3 bench/torch/vit_survey_zoo_reference.py export OUT_DIR [model ...]
      writes OUT_DIR/<model>.safetensors (the timm state_dict, random init with seed 0) and
      OUT_DIR/<model>.io.safetensors (a fixed input `input` [2, 3, S, S] and timm's eval
      logits `logits`); the Rust test `timm_parity` (ignored by default) compares against them.
  python3 bench/torch/vit_survey_zoo_reference.py export-official MODEL OUT_DIR FILE.py
      the same for models timm does not have, from their official repositories' code:
      pvt_tiny (whai362/PVT classification/pvt.py, 224x224) and cmt_ti
      (huawei-noah/Efficient-AI-Backbones cmt_pytorch/cmt.py, 160x160).
  python3 bench/torch/vit_survey_zoo_reference.py bench [--threads 2] [--batch 8] [--seconds 5] [model ...]
      forward images/s at 224x224 in eval mode, printed as `model img/s` (1 s of warm-up first).
  python3 bench/torch/vit_survey_zoo_reference.py serve [--threads 2] [--batch 8] [--seconds 5]
      the same for one model per line of stdin, in one warm process (what `cargo xtask vit
      bench` runs, alternating its own measurements with these).
  python3 bench/torch/vit_survey_zoo_reference.py macs [model ...]
      PyTorch FLOP counter's count, halved (multiply-accumulates), for one 224x224 image.
"""
import sys, time
import torch, timm
from safetensors.torch import save_file

DEFAULT = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
           "pvt_v2_b0", "pit_ti_224", "convit_tiny", "tnt_s_patch16_224", "levit_128s"]


def make(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    # give zero-initialised tensors (biases, tokens, position tables) random values so the
    # comparison exercises every parameter
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for k, b in m.named_buffers():
            if k.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
    return m


def export(out, names):
    import os
    os.makedirs(out, exist_ok=True)
    for n in names:
        m = make(n)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file(sd, f"{out}/{n}.safetensors")
        size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            y = m(x)
        save_file({"input": x.contiguous(), "logits": y.contiguous()}, f"{out}/{n}.io.safetensors")
        print(n, "exported", tuple(y.shape))


def export_official(name, out, path):
    import importlib.util, os
    os.makedirs(out, exist_ok=True)
    spec = importlib.util.spec_from_file_location("pvt_official", path)
    mod = importlib.util.module_from_spec(spec)
    import sys as _sys
    _sys.modules["pvt_official"] = mod
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    size = {"pvt_tiny": 224, "cmt_ti": 160}[name]
    m = getattr(mod, name)(img_size=size).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for k, b in m.named_buffers():
            if k.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{out}/{name}.safetensors")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
    save_file({"input": x.contiguous(), "logits": y.contiguous()}, f"{out}/{name}.io.safetensors")
    print(name, "exported", tuple(y.shape))


def timed(m, x, seconds):
    """Images/s of eval-mode forwards of `m` on `x`: at least 1 s of warm-up forwards, then at
    least 3 forwards and `seconds` timed."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        m(x)
        while time.perf_counter() - t0 < 1.0:
            m(x)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < seconds:
            m(x)
            reps += 1
        return x.shape[0] * reps / (time.perf_counter() - t0)


def bench(names, threads, batch, seconds=5.0):
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 224, 224)
    for n in names:
        print(f"{n} {timed(make(n), x, seconds):.2f}", flush=True)


def serve(threads, batch, seconds):
    """Like `bench`, one model per line of stdin (models built once and kept), so that a caller
    can alternate its own measurements with these in one warm process."""
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 224, 224)
    models = {}
    # imports done: the caller starts timing its own models only now
    print("ready", flush=True)
    for line in sys.stdin:
        n = line.strip()
        if n:
            if n not in models:
                models[n] = make(n)
            print(f"{n} {timed(models[n], x, seconds):.2f}", flush=True)


def macs(names):
    from torch.utils.flop_counter import FlopCounterMode
    for n in names:
        m = make(n)
        x = torch.randn(1, 3, 224, 224)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        print(f"{n} {fc.get_total_flops() / 2 / 1e9:.4f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "export":
        export(args[0], args[1:] or DEFAULT)
    elif cmd == "export-official":
        export_official(args[0], args[1], args[2])
    elif cmd in ("bench", "serve"):
        threads, batch, seconds, rest = 2, 8, 5.0, []
        it = iter(args)
        for a in it:
            if a == "--threads":
                threads = int(next(it))
            elif a == "--batch":
                batch = int(next(it))
            elif a == "--seconds":
                seconds = float(next(it))
            else:
                rest.append(a)
        if cmd == "bench":
            bench(rest or DEFAULT, threads, batch, seconds)
        else:
            serve(threads, batch, seconds)
    elif cmd == "macs":
        macs(args or DEFAULT)
    else:
        sys.exit(__doc__)
