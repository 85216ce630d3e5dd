//! Every parameter of every binary model gets a finite gradient; counts are pinned.

use bnn_core::{count, BiMlp, BiMlpConfig, BinaryConfig, BinaryFactory, LnsRegistry, Quantizer};
use candle_core::{Device, Result, Tensor};
use nn_core::models::{create_model, ModelConfig};
use nn_core::testing::check_all_params_get_gradients;
use nn_core::{Model, VarStore};

fn input(n: usize, c: usize, s: usize) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, (n, c, s, s), &Device::Cpu)
}

#[test]
fn binary_backbones_from_create_model_get_gradients() -> Result<()> {
    let dev = Device::Cpu;
    for (model, method, size) in [
        ("resnet20", "ste", 8),
        ("resnet20", "approxsign", 8),
        ("resnet20", "fda", 8),
        ("resnet20", "fda-noise", 8),
        ("resnet20-b", "fda-noise", 8),
        ("vgg-small", "fda", 8),
        ("resnet18", "ste", 32),
    ] {
        let vs = VarStore::new(1, &dev);
        let f = BinaryFactory::new(BinaryConfig::from_method(method)?);
        let m = create_model(model, &ModelConfig::new(3, 10, size), &vs.root(), &f)?;
        check_all_params_get_gradients(m.as_ref(), &vs, &input(4, 3, size)?)
            .map_err(|e| candle_core::Error::Msg(format!("{model} {method}: {e}")))?;
    }
    Ok(())
}

#[test]
fn lns_model_gets_gradients_through_mapping_networks() -> Result<()> {
    let dev = Device::Cpu;
    let vs = VarStore::new(2, &dev);
    let reg = LnsRegistry::new();
    let f = BinaryFactory::new(BinaryConfig::new(Quantizer::STE)).with_lns(reg.clone());
    let m = create_model("resnet20", &ModelConfig::new(3, 10, 8), &vs.root(), &f)?;
    assert_eq!(reg.len(), 18);
    check_all_params_get_gradients(m.as_ref(), &vs, &input(4, 3, 8)?)?;
    // the LNS loss alone reaches every mapping network
    reg.set_labels_from_weights()?;
    let l = reg.loss(0.1, true)?.expect("labels set");
    let g = l.backward()?;
    for p in vs.trainable().iter().filter(|p| p.name.contains("lns_map.conv")) {
        assert!(g.get(p.var.as_tensor()).is_some(), "{}", p.name);
    }
    Ok(())
}

#[test]
fn bimlp_small_and_plain_get_gradients() -> Result<()> {
    let dev = Device::Cpu;
    for cfg in [BiMlpConfig::small(), BiMlpConfig::small().plain()] {
        for method in ["ste", "fda-noise"] {
            let vs = VarStore::new(3, &dev);
            let f = BinaryFactory::new(BinaryConfig::from_method(method)?);
            let m = BiMlp::new(&vs.root(), &ModelConfig::new(1, 10, 28), &cfg, &f)?;
            // the released initialisation puts zero weight on the depthwise branches, which
            // then get no gradient at the first step: move the weights off zero to check the
            // wiring
            for p in vs.trainable().iter().filter(|p| p.name.ends_with("branch_weight")) {
                p.var.set(&Tensor::new(&[0.3f32, 0.2], &dev)?)?;
            }
            // images with different brightness, so that the globally pooled features fed to
            // the reweighting MLP differ in sign across the batch (its BN normalises over it)
            let offsets = Tensor::new(&[-1.5f32, -0.5, 0.5, 1.5], &dev)?.reshape((4, 1, 1, 1))?;
            let x = input(4, 1, 28)?.broadcast_add(&offsets)?;
            check_all_params_get_gradients(&m, &vs, &x).map_err(|e| candle_core::Error::Msg(format!("{} {method}: {e}", cfg.name)))?;
        }
    }
    Ok(())
}

fn counts_of(m: &dyn Model, c: usize, s: usize) -> Result<bnn_core::BinaryCounts> {
    let (k, summary) = count(m, (c, s, s), &Device::Cpu)?;
    println!("{}: {k:?}\n{summary}", m.name());
    Ok(k)
}

#[test]
fn binary_resnet20_counts_are_pinned() -> Result<()> {
    let vs = VarStore::new(0, &Device::Cpu);
    let f = BinaryFactory::new(BinaryConfig::new(Quantizer::STE));
    let m = create_model("resnet20", &ModelConfig::new(3, 10, 32), &vs.root(), &f)?;
    let k = counts_of(m.as_ref(), 3, 32)?;
    // by hand: binary 3x3 convs per stage (16: 6 x 16*16*9; 32: 16*32*9 + 5 x 32*32*9;
    // 64: 32*64*9 + 5 x 64*64*9) on 32x32, 16x16, 8x8 maps
    let stage = [6 * 2304, 4608 + 5 * 9216, 18432 + 5 * 36864];
    assert_eq!(k.binary_params, stage.iter().sum::<usize>());
    assert_eq!(k.bops, (stage[0] * 1024 + stage[1] * 256 + stage[2] * 64) as u64);
    // float MACs: stem 3*16*9 at 32x32 + fc 64*10
    assert_eq!(k.flops, 432 * 1024 + 640);
    // float params: stem 432, 19 BN x 2, 18 PReLU, 18 scale vectors, fc 650
    let bn_prelu_scale: usize = [16usize; 7]
        .iter()
        .chain([32usize; 6].iter())
        .chain([64usize; 6].iter())
        .sum::<usize>();
    assert_eq!(k.float_params, 432 + 2 * bn_prelu_scale + 2 * (bn_prelu_scale - 16) + 650);
    assert_eq!((k.float_params, k.binary_params, k.flops, k.bops), (3802, 267264, 443008, 40108032));
    assert!((k.ops - 1_069_696.0).abs() < 0.5);
    Ok(())
}

#[test]
fn bimlp_counts_are_pinned() -> Result<()> {
    for (cfg, size) in [(BiMlpConfig::small(), 32), (BiMlpConfig::s(), 224), (BiMlpConfig::m(), 224)] {
        let vs = VarStore::new(0, &Device::Cpu);
        let f = BinaryFactory::new(BinaryConfig::new(Quantizer::STE));
        let m = BiMlp::new(&vs.root(), &ModelConfig::new(3, 1000, size), &cfg, &f)?;
        let (k, summary) = count(&m, (3, size, size), &Device::Cpu)?;
        println!("{}: {k:?}, OPs {:.3e}", cfg.name, k.ops);
        // independent check: stored variables = float + binary parameters minus the per-channel
        // weight scales, which are derived from W (stored at inference, not trained)
        let scales: usize = summary
            .layers
            .iter()
            .filter(|l| l.kind == "BinaryConv2d")
            .map(|l| l.out_shape[1])
            .sum();
        assert_eq!(k.float_params + k.binary_params, vs.num_params() + scales, "{}", cfg.name);
        // Pinned by hand in two steps. The counts of the first implementation (before the
        // released code's block), then what the released layout adds, per block of width c
        // on an h x w map: binary weights 14c (depthwise 1x7 and 7x1 branches) + c^2
        // (reweighting MLP c -> c/4 -> 3c); float parameters 14c + 22c (those layers' biases,
        // BNs, RPReLUs and weight scales) + 20c (BN + RPReLU on the channel MLP's tiled
        // shortcut) + 2 (branch weights) - 3c (the former static merge); binary MACs
        // 14c hw + c^2 (the reweighting MLP runs on the pooled 1 x 1 map); plus an RPReLU
        // after the stem and after every downsampling (3 parameters per channel).
        let added = |hw: [usize; 4]| {
            let (mut float, mut binary, mut bops) = (3 * cfg.dims[0] + 3 * cfg.dims[1..].iter().sum::<usize>(), 0, 0);
            for s in 0..4 {
                let c = cfg.dims[s];
                float += cfg.layers[s] * (53 * c + 2);
                binary += cfg.layers[s] * (14 * c + c * c);
                bops += cfg.layers[s] * (14 * c * hw[s] + c * c);
            }
            (float, binary, bops as u64)
        };
        let (first, hw) = match cfg.name.as_str() {
            "bimlp-small" => ((361_800 + 1824, 1_464_960, 2_050_048, 18_837_504), [256, 64, 16, 4]),
            "bimlp-s" => (
                (
                    1_000_232 + 3 * (2 * 64 + 2 * 128 + 4 * 320 + 2 * 512),
                    13_723_136,
                    119_930_880,
                    2_228_215_808,
                ),
                [3136, 784, 196, 49],
            ),
            _ => (
                (
                    1_248_552 + 3 * (2 * 64 + 3 * 128 + 10 * 320 + 3 * 512),
                    26_295_808,
                    119_930_880,
                    4_287_840_256,
                ),
                [3136, 784, 196, 49],
            ),
        };
        let (df, db, dops) = added(hw);
        let want = (first.0 + df, first.1 + db, first.2, first.3 + dops);
        assert_eq!((k.float_params, k.binary_params, k.flops, k.bops), want, "{}", cfg.name);
    }
    Ok(())
}
