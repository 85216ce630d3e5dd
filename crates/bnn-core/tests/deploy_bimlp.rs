//! Packed binary layers (dense, grouped, rectangular, dilated) and the packed BiMLP against the
//! candle forward pass, and the BiMLP model file.

use bnn_core::bimlp::{BiMlp, BiMlpConfig};
use bnn_core::deploy::{format, DeployedModel, Kernel, KernelCell, PackedBiMlp, PackedFactory};
use bnn_core::{BinaryConfig, BinaryFactory};
use candle_core::{Device, Result, Tensor};
use nn_core::factory::{LayerFactory, LayerRole};
use nn_core::layers::Conv2dConfig;
use nn_core::models::ModelConfig;
use nn_core::{Model, VarStore};
use std::collections::{BTreeMap, HashMap};

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
}

/// Random NCHW input where about one value in eight is exactly 0 (`sign(0) = +1`).
fn input(n: usize, c: usize, h: usize, w: usize) -> Result<Tensor> {
    let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &Device::Cpu)?;
    let keep = Tensor::rand(0f32, 1.0, (n, c, h, w), &Device::Cpu)?.ge(0.125)?;
    keep.where_cond(&x, &x.zeros_like()?)
}

#[test]
fn packed_layers_equal_binary_conv2d_bit_for_bit() -> Result<()> {
    let mut cases = vec![
        Conv2dConfig::new(5, 7, 3),
        Conv2dConfig::new(70, 9, 3).stride(2),
        Conv2dConfig::new(16, 16, 1),
        Conv2dConfig::new(130, 12, 1).bias(true),
        Conv2dConfig::new(6, 4, 3).groups(2).stride(2).dilation(2).padding(2),
    ];
    // BiMLP's depthwise token FCs: 1 x 7 and 7 x 1, one and two inputs per group
    let mut wide = Conv2dConfig::new(8, 8, 1).groups(8);
    (wide.kernel, wide.padding) = ((1, 7), (0, 3));
    let mut tall = Conv2dConfig::new(16, 8, 1).groups(8);
    (tall.kernel, tall.padding) = ((7, 1), (3, 0));
    let mut odd = Conv2dConfig::new(3, 5, 1).bias(true);
    (odd.kernel, odd.stride, odd.padding) = ((2, 3), (2, 1), (1, 0));
    cases.extend([wide, tall, odd]);
    for scale_weights in [true, false] {
        let mut bc = BinaryConfig::from_method("ste")?;
        bc.scale_weights = scale_weights;
        for (i, cfg) in cases.iter().enumerate() {
            let vs = VarStore::new(i as u64, &Device::Cpu);
            let vp = vs.root().pp(format!("l{i}"));
            let trained = BinaryFactory::new(bc).conv2d(&vp, *cfg, LayerRole::Body)?;
            if cfg.bias {
                let b = vs.get(&format!("l{i}.bias")).expect("bias");
                b.var.set(&Tensor::randn(0f32, 0.3, cfg.out_channels, &Device::Cpu)?)?;
            }
            // a map larger than one GEMM tile (64 pixels), and one smaller than the kernels
            for (h, w) in [(11usize, 7usize), (2, 3)] {
                let x = input(3, cfg.in_channels, h, w)?;
                let want = trained.forward_t(&x, false)?;
                for k in Kernel::available() {
                    let pf = PackedFactory::from_trained(bc, &vs.tensors(), KernelCell::new(k)).map_err(candle_core::Error::msg)?;
                    let vs2 = VarStore::new(0, &Device::Cpu);
                    let packed = pf.conv2d(&vs2.root().pp(format!("l{i}")), *cfg, LayerRole::Body)?;
                    assert!(vs2.all().is_empty(), "a packed binary conv creates no variables");
                    let got = packed.forward_t(&x, false)?;
                    assert_eq!(got.dims(), want.dims(), "{cfg:?}");
                    assert_eq!(bits(&got)?, bits(&want)?, "{cfg:?} {h}x{w} kernel {k:?} scale {scale_weights}");
                }
            }
        }
    }
    Ok(())
}

/// A BiMLP with random weights and non-trivial BatchNorm statistics, shifts, slopes and branch
/// weights.
fn random_bimlp(cfg: &BiMlpConfig, mc: &ModelConfig, seed: u64) -> Result<(BiMlp, VarStore, BinaryConfig)> {
    let vs = VarStore::new(seed, &Device::Cpu);
    let bc = BinaryConfig::from_method("ste")?;
    let m = BiMlp::new(&vs.root(), mc, cfg, &BinaryFactory::new(bc))?;
    let mut t = vs.tensors();
    for (k, v) in t.iter_mut() {
        let (n, d) = (v.elem_count(), v.dims().to_vec());
        let r = |lo: f32, hi: f32| Tensor::rand(lo, hi, n, &Device::Cpu)?.reshape(d.clone());
        if k.ends_with("running_var") {
            *v = r(0.5, 2.0)?;
        } else if k.ends_with("running_mean") || k.ends_with("branch_weight") {
            *v = r(-0.5, 0.5)?;
        } else if k.contains("bn.") || k.contains("norm") {
            *v = if k.ends_with("weight") { r(0.5, 1.5)? } else { r(-0.3, 0.3)? };
        } else if k.contains("prelu") {
            *v = r(-0.5, 0.8)?;
        } else if k.contains("shift_") || k.contains("move") {
            *v = r(-0.2, 0.2)?;
        }
    }
    vs.load_tensors(&t, true)?;
    Ok((m, vs, bc))
}

#[test]
fn packed_bimlp_equals_candle_forward_bit_for_bit() -> Result<()> {
    for (name, mc) in [
        ("bimlp-small", ModelConfig::new(1, 10, 28)),
        ("bimlp-small-plain", ModelConfig::new(3, 7, 16)),
    ] {
        let cfg = BiMlpConfig::by_name(name)?;
        let (m, vs, bc) = random_bimlp(&cfg, &mc, 7)?;
        let packed = PackedBiMlp::export(&vs.tensors(), &mc, &cfg, &bc, Kernel::best()).map_err(candle_core::Error::msg)?;
        // every binary FC is packed (grouped token FCs included) and no binary weight is kept
        assert!(packed.layers.keys().any(|k| k.ends_with("sfc_h.fc")) == cfg.multi_branch, "{name}");
        assert!(packed.layers.keys().any(|k| k.ends_with("mixer.h.token.fc")), "{name}");
        assert!(packed.floats.keys().all(|k| !k.ends_with(".fc.weight")), "{name}");
        let x = input(3, mc.in_channels, mc.image_size, mc.image_size)?;
        let want = m.forward_t(&x, false)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for k in Kernel::available() {
            packed.set_kernel(k);
            let got = packed.forward(&xs, 3).map_err(candle_core::Error::msg)?;
            let want_v: Vec<f32> = want.flatten_all()?.to_vec1()?;
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want_v.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name} kernel {k:?}: {got:?} vs {want_v:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn bimlp_file_roundtrip_and_corruption_are_detected() -> Result<()> {
    let mc = ModelConfig::new(1, 10, 16);
    let cfg = BiMlpConfig::small();
    let (_, vs, bc) = random_bimlp(&cfg, &mc, 3)?;
    let packed = PackedBiMlp::export(&vs.tensors(), &mc, &cfg, &bc, Kernel::Portable).map_err(candle_core::Error::msg)?;
    let mut src = BTreeMap::new();
    src.insert("run".to_string(), "test".to_string());
    let bytes = packed.to_bytes(src).unwrap();
    let (back, arch) = PackedBiMlp::from_bytes(&bytes, Kernel::best()).unwrap();
    assert!(back.same_as(&packed));
    assert_eq!(arch.source["run"], "test");
    let x: Vec<f32> = input(2, 1, 16, 16)?.flatten_all()?.to_vec1()?;
    assert_eq!(back.forward(&x, 2).unwrap(), packed.forward(&x, 2).unwrap());
    // any model file loads by its kind
    match DeployedModel::from_bytes(&bytes, Kernel::best()).unwrap() {
        DeployedModel::BiMlp(m, _) => assert!(m.same_as(&packed)),
        other => panic!("loaded as {other:?}"),
    }
    // the ResNet reader names the kind it found
    let e = format::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("a `bimlp` model, not a `resnet` model"), "{e}");
    // a flipped bit: checksum mismatch; truncated: not a valid file
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 100] ^= 0x10;
    let e = PackedBiMlp::from_bytes(&bad, Kernel::best()).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    let e = PackedBiMlp::from_bytes(&bytes[..n - 9], Kernel::best()).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // through a file: the error names it
    let dir = std::env::temp_dir().join(format!("bnn-bimlp-file-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bimlp.safetensors");
    packed.save(BTreeMap::new(), &p).unwrap();
    assert!(PackedBiMlp::load(&p, Kernel::best()).unwrap().0.same_as(&packed));
    std::fs::write(&p, &bad).unwrap();
    let e = DeployedModel::load(&p, Kernel::best()).unwrap_err().to_string();
    assert!(e.contains("bimlp.safetensors") && e.contains("corrupted"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    // a missing trained tensor is named, binary or full precision
    for missing in ["stage1.0.mlp.fc1.fc.weight", "stage2.0.norm1.running_var"] {
        let mut partial: HashMap<String, Tensor> = vs.tensors();
        assert!(partial.remove(missing).is_some(), "{missing}");
        let e = PackedBiMlp::export(&partial, &mc, &cfg, &bc, Kernel::best()).unwrap_err();
        assert!(e.contains(missing), "{e}");
    }
    // W1A32 cannot be packed
    let mut w1a32 = bc;
    w1a32.binarize_activations = false;
    let e = PackedBiMlp::export(&vs.tensors(), &mc, &cfg, &w1a32, Kernel::best()).unwrap_err();
    assert!(e.contains("W1A32"), "{e}");
    Ok(())
}
