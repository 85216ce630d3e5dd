//! The packed inference engine against candle on whole models, and the model file format.

use bnn_core::deploy::{export, format, Kernel};
use bnn_core::{BinaryConfig, BinaryFactory};
use candle_core::{Device, Result, Tensor};
use nn_core::models::{create_model, ModelConfig};
use nn_core::VarStore;
use std::collections::{BTreeMap, HashMap};

/// A binary model with random weights and non-trivial BatchNorm statistics and PReLU slopes.
/// With `near_zero`, every other channel of each binary convolution's BatchNorm gets
/// `running_mean = k alpha_o (1 + u 1e-7)` (`k` a small integer, `u` in [-1, 1]) and `beta = 0`,
/// so that wherever the integer dot product equals `k` the pre-activation is a rounding-level
/// value whose sign depends on exactly how it is computed.
fn random_binary(model: &str, mc: &ModelConfig, seed: u64, near_zero: bool) -> Result<(Box<dyn nn_core::Model>, VarStore)> {
    let vs = VarStore::new(seed, &Device::Cpu);
    let f = BinaryFactory::new(BinaryConfig::from_method("ste")?);
    let m = create_model(model, mc, &vs.root(), &f)?;
    let mut t = vs.tensors();
    for (k, v) in t.iter_mut() {
        let n = v.elem_count();
        if k.ends_with("running_var") {
            *v = (Tensor::rand(0.5f32, 2.0, n, &Device::Cpu)?).reshape(v.dims())?;
        } else if k.ends_with("running_mean") || (k.contains("bn") && k.ends_with("bias")) {
            *v = (Tensor::randn(0f32, 0.5, n, &Device::Cpu)?).reshape(v.dims())?;
        } else if k.contains("bn") && k.ends_with("weight") {
            *v = (Tensor::rand(0.5f32, 1.5, n, &Device::Cpu)?).reshape(v.dims())?;
        } else if k.contains("act") {
            *v = (Tensor::rand(-0.5f32, 0.8, n, &Device::Cpu)?).reshape(v.dims())?;
        }
    }
    if near_zero {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let bns: Vec<String> = t
            .keys()
            .filter(|k| k.starts_with("layer") && k.ends_with(".running_mean"))
            .map(|k| k.trim_end_matches(".running_mean").to_string())
            .collect();
        for bn in bns {
            let conv = match bn.strip_suffix(".bn") {
                Some(p) => format!("{p}.conv"),
                None => bn.replace(".bn", ".conv"),
            };
            let alpha: Vec<f32> = bnn_core::weight_scale(&t[&format!("{conv}.weight")])?.to_vec1()?;
            let mut mean: Vec<f32> = t[&format!("{bn}.running_mean")].to_vec1()?;
            let mut beta: Vec<f32> = t[&format!("{bn}.bias")].to_vec1()?;
            for o in (0..alpha.len()).step_by(2) {
                let k = (next() * 13.0).floor() - 6.0;
                let u = 2.0 * next() - 1.0;
                mean[o] = (k * alpha[o] as f64 * (1.0 + 1e-7 * u)) as f32;
                beta[o] = 0.0;
            }
            let c = mean.len();
            t.insert(format!("{bn}.running_mean"), Tensor::from_vec(mean, c, &Device::Cpu)?);
            t.insert(format!("{bn}.bias"), Tensor::from_vec(beta, c, &Device::Cpu)?);
        }
    }
    vs.load_tensors(&t, true)?;
    Ok((m, vs))
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}

/// The engine against candle: the feature map before pooling bit-identical, logits within
/// 1e-5 relative, the same argmax for every image.
fn compare(model: &str, mc: ModelConfig, batch: usize, seed: u64, near_zero: bool) -> Result<()> {
    let (m, vs) = random_binary(model, &mc, seed, near_zero)?;
    let packed = export::export_resnet(&vs.tensors(), model, &mc, &BinaryConfig::from_method("ste")?).map_err(candle_core::Error::msg)?;
    let x = Tensor::randn(0f32, 1.0, (batch, mc.in_channels, mc.image_size, mc.image_size), &Device::Cpu)?;
    let want: Vec<f32> = m.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
    let stages = m.forward_stages(&x, false)?;
    let want_map: Vec<f32> = stages[stages.len() - 2].flatten_all()?.to_vec1()?;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let k = mc.num_classes;
    for kernel in Kernel::available() {
        let map = packed.feature_map(&xv, batch, kernel).map_err(candle_core::Error::msg)?.to_nchw();
        assert_eq!(map.len(), want_map.len());
        let differ = map.iter().zip(&want_map).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{model} kernel {}: {differ} feature values differ from candle",
            kernel.name()
        );
        let got = packed.forward(&xv, batch, kernel).map_err(candle_core::Error::msg)?;
        let scale = want.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |s, (a, b)| s.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{model} kernel {}: max diff {diff} vs logit scale {scale}",
            kernel.name()
        );
        for i in 0..batch {
            assert_eq!(
                argmax(&got[i * k..(i + 1) * k]),
                argmax(&want[i * k..(i + 1) * k]),
                "{model} image {i}"
            );
        }
    }
    Ok(())
}

#[test]
fn packed_resnet20_matches_candle_forward() -> Result<()> {
    // option A shortcuts, MNIST-like 1 x 12 x 12 (odd spatial sizes after stride 2: 6, 3)
    compare("resnet20", ModelConfig::new(1, 10, 12), 3, 1, false)?;
    // option B (float 1x1 projection shortcuts), 3 channels, 8 x 8
    compare("resnet20-b", ModelConfig::new(3, 7, 8), 2, 2, false)
}

/// Many pre-activations at rounding level: the engine must still be bit-identical.
#[test]
fn packed_resnet_is_bit_exact_on_near_zero_preactivations() -> Result<()> {
    compare("resnet20", ModelConfig::new(3, 10, 10), 4, 7, true)?;
    compare("resnet20-b", ModelConfig::new(1, 5, 9), 3, 8, true)
}

#[test]
fn model_file_roundtrip_and_corruption_are_detected() -> Result<()> {
    let mc = ModelConfig::new(1, 10, 8);
    let (_, vs) = random_binary("resnet20", &mc, 3, false)?;
    let packed =
        export::export_resnet(&vs.tensors(), "resnet20", &mc, &BinaryConfig::from_method("ste")?).map_err(candle_core::Error::msg)?;
    let mut src = BTreeMap::new();
    src.insert("run".to_string(), "test".to_string());
    let bytes = format::to_bytes(&packed, src).unwrap();
    let (back, arch) = format::from_bytes(&bytes).unwrap();
    assert_eq!(back, packed);
    assert_eq!(arch.source["run"], "test");
    // a flipped bit in the tensor data: checksum mismatch
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 100] ^= 0x10;
    let e = format::from_bytes(&bad).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    // truncated
    let e = format::from_bytes(&bytes[..bytes.len() - 7]).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = format::from_bytes(&bytes[..5]).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // another format version is rejected, naming both versions
    let v1 = format::to_bytes_version(&packed, BTreeMap::new(), 1).unwrap();
    let e = format::from_bytes(&v1).unwrap_err().to_string();
    assert!(e.contains("format version 1") && e.contains("version 2"), "{e}");
    // a safetensors file that is not a model
    let other = safetensors::tensor::serialize(Vec::<(String, safetensors::tensor::TensorView)>::new(), &None).unwrap();
    let e = format::from_bytes(&other).unwrap_err().to_string();
    assert!(e.contains("not a `compact-vision/bnn-deploy` model"), "{e}");
    // save / load through a file names the file
    let dir = std::env::temp_dir().join(format!("bnn-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.safetensors");
    format::save(&packed, BTreeMap::new(), &p).unwrap();
    assert_eq!(format::load(&p).unwrap().0, packed);
    std::fs::write(&p, &bad).unwrap();
    let e = format::load(&p).unwrap_err().to_string();
    assert!(e.contains("m.safetensors") && e.contains("corrupted"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    // unsupported models and missing tensors are named
    let e = export::export_resnet(&vs.tensors(), "vgg-small", &mc, &BinaryConfig::from_method("ste")?).unwrap_err();
    assert!(e.contains("vgg-small"), "{e}");
    let mut partial: HashMap<String, Tensor> = vs.tensors();
    partial.remove("layer2.0.conv1.weight");
    let e = export::export_resnet(&partial, "resnet20", &mc, &BinaryConfig::from_method("ste")?).unwrap_err();
    assert!(e.contains("layer2.0.conv1.weight"), "{e}");
    Ok(())
}
