//! Every backbone: exact parameter counts, shapes, and gradients reaching every parameter.

use nn_core::candle_core::{DType, Device, Result, Tensor};
use nn_core::models::{create_model, ModelConfig, MODEL_NAMES};
use nn_core::testing::check_all_params_get_gradients;
use nn_core::{StandardFactory, VarStore};

fn count(name: &str, cfg: ModelConfig) -> Result<usize> {
    let vs = VarStore::new(0, &Device::Cpu);
    create_model(name, &cfg, &vs.root(), &StandardFactory)?;
    Ok(vs.num_params())
}

#[test]
fn cifar_resnet_parameter_counts_match_he_et_al() -> Result<()> {
    let c = ModelConfig::new(3, 10, 32);
    for (name, expect) in [
        ("resnet20", 269_722),
        ("resnet20-b", 272_474),
        ("resnet32", 464_154),
        ("resnet32-b", 466_906),
        ("resnet56", 853_018),
        ("resnet56-b", 855_770),
    ] {
        assert_eq!(count(name, c)?, expect, "{name}");
    }
    Ok(())
}

#[test]
fn imagenet_resnet_parameter_counts() -> Result<()> {
    assert_eq!(count("resnet18", ModelConfig::new(3, 1000, 224))?, 11_689_512);
    assert_eq!(count("resnet34", ModelConfig::new(3, 1000, 224))?, 21_797_672);
    // torchvision's counts (bottleneck blocks; BN affine parameters included)
    assert_eq!(count("resnet50", ModelConfig::new(3, 1000, 224))?, 25_557_032);
    assert_eq!(count("resnet101", ModelConfig::new(3, 1000, 224))?, 44_549_160);
    assert_eq!(count("resnet152", ModelConfig::new(3, 1000, 224))?, 60_192_808);
    Ok(())
}

#[test]
fn lenet_and_vgg_parameter_counts() -> Result<()> {
    // LeNet-5: 156 + 2416 + 48120 + 10164 + 850
    assert_eq!(count("lenet5", ModelConfig::new(1, 10, 28))?, 61_706);
    // SHOT's LeNet: conv 1*20*25 + 20, conv 20*50*25 + 50, fc 800*10 + 10
    assert_eq!(count("lenet-shot", ModelConfig::new(1, 10, 28))?, 520 + 25_050 + 8_010);
    // VGG-small on CIFAR: convs 3*128*9 + 128*128*9 + 128*256*9 + 256*256*9 + 256*512*9 + 512*512*9,
    // BN 2*(128+128+256+256+512+512), fc 8192*10 + 10
    let convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512);
    assert_eq!(count("vgg-small", ModelConfig::new(3, 10, 32))?, convs + 2 * 1792 + 8192 * 10 + 10);
    Ok(())
}

#[test]
fn unknown_model_lists_valid_names() {
    let vs = VarStore::new(0, &Device::Cpu);
    let err = create_model("resnet21", &ModelConfig::new(3, 10, 32), &vs.root(), &StandardFactory)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("resnet20") && err.contains("lenet5"), "{err}");
}

#[test]
fn same_seed_same_weights() -> Result<()> {
    let a = VarStore::new(5, &Device::Cpu);
    let b = VarStore::new(5, &Device::Cpu);
    create_model("resnet20", &ModelConfig::new(1, 10, 28), &a.root(), &StandardFactory)?;
    create_model("resnet20", &ModelConfig::new(1, 10, 28), &b.root(), &StandardFactory)?;
    let (ta, tb) = (a.tensors(), b.tensors());
    for (k, v) in ta {
        let d = (v - &tb[&k])?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{k}");
    }
    Ok(())
}

/// One backward pass gives every trainable parameter of every registered model a finite,
/// non-zero gradient, and the logits have the right shape.
#[test]
fn every_model_every_parameter_gets_a_gradient() -> Result<()> {
    for (name, _) in MODEL_NAMES {
        let (cfg, batch) = match *name {
            "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152" => (ModelConfig::new(3, 7, 64), 2),
            _ => (ModelConfig::new(3, 7, 32), 3),
        };
        let vs = VarStore::new(1, &Device::Cpu);
        let model = create_model(name, &cfg, &vs.root(), &StandardFactory)?;
        let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, cfg.image_size, cfg.image_size), &Device::Cpu)?;
        let logits = model.forward_t(&x, false)?;
        assert_eq!(logits.dims(), &[batch, 7], "{name}");
        assert_eq!(logits.dtype(), DType::F32);
        check_all_params_get_gradients(model.as_ref(), &vs, &x).map_err(|e| nn_core::candle_core::Error::Msg(format!("{name}: {e}")))?;
    }
    Ok(())
}

#[test]
fn summary_counts_match_parameters_and_known_macs() -> Result<()> {
    let vs = VarStore::new(0, &Device::Cpu);
    let model = create_model("resnet20", &ModelConfig::new(3, 10, 32), &vs.root(), &StandardFactory)?;
    let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
    let (_, s) = nn_core::summary::profile(|| model.forward_t(&x, false))?;
    assert_eq!(s.total_params(), vs.num_params());
    // ResNet-20 on 32x32: stem 442,368 + stage1 14,155,776 + stages 2, 3 12,976,128 each, + fc 640.
    assert_eq!(s.total_macs(), 40_550_400 + 640);
    let table = s.to_string();
    assert!(table.contains("layer3.2.conv2") && table.contains("total"));
    Ok(())
}

#[test]
fn bottleneck_resnet_macs_match_pytorch_flop_counter() -> Result<()> {
    // torch.utils.flop_counter on torchvision's resnet50 / resnet101 at 1x3x224x224, halved
    for (name, macs) in [("resnet50", 4_089_184_256u64), ("resnet101", 7_801_405_440)] {
        let vs = VarStore::new(0, &Device::Cpu);
        let model = create_model(name, &ModelConfig::new(3, 1000, 224), &vs.root(), &StandardFactory)?;
        let x = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?;
        let (_, s) = nn_core::summary::profile(|| model.forward_t(&x, false))?;
        assert_eq!(s.total_macs(), macs, "{name}");
    }
    Ok(())
}
