//! Coupled channel groups of the nn-core backbones, and physically pruned models that compute
//! exactly what the masked models compute.

use nn_core::candle_core::{DType, Device, Tensor};
use nn_core::models::ModelConfig;
use nn_core::{StandardFactory, VarStore};
use pruning::graph::Role;
use pruning::{apply_mask, count, criteria, prune_model, Arch, ChannelGraph, Pruned, Selection};

fn graph(name: &str, cfg: &ModelConfig) -> ChannelGraph {
    Arch::from_name(name).unwrap().graph(cfg)
}

fn sizes(g: &ChannelGraph, pred: impl Fn(&pruning::ChannelGroup) -> bool) -> Vec<usize> {
    g.groups.iter().filter(|x| pred(x)).map(|x| x.len()).collect()
}

#[test]
fn resnet20_option_a_groups() {
    let cfg = ModelConfig::new(3, 10, 32);
    let g = graph("resnet20", &cfg);
    // 9 block-inner groups, 3 residual-stream groups chained by zero padding, input, logits
    assert_eq!(g.groups.len(), 14);
    assert_eq!(
        sizes(&g, |x| criteria::is_block_inner(&g, x)),
        vec![16, 16, 16, 32, 32, 32, 64, 64, 64]
    );
    assert!(g.groups.iter().filter(|x| criteria::is_block_inner(&g, x)).all(|x| x.prunable()));
    // stage-1 stream channel i is stage-2 channel i + 8 and stage-3 channel i + 24
    let s1 = g.group_of("conv1").unwrap();
    assert_eq!(s1.len(), 16);
    let pos = |name: &str| s1.spaces.iter().position(|&s| s == g.space_id(name).unwrap()).unwrap();
    assert_eq!(s1.units[3][pos("layer1.2.conv2")], 3);
    assert_eq!(s1.units[3][pos("layer2.0.conv2")], 11);
    assert_eq!(s1.units[3][pos("layer3.2.conv2")], 27);
    // stage-2 padding channels continue into stage 3; stage-3 padding is alone
    let s3_only = g
        .groups
        .iter()
        .find(|x| x.spaces.iter().all(|&s| g.spaces[s].name.starts_with("layer3")) && !criteria::is_block_inner(&g, x));
    assert_eq!(s3_only.unwrap().len(), 32);
    assert!(!s1.prunable(), "option-A streams cannot be rebuilt smaller");
    assert!(g.group_of("input").unwrap().blocked.is_some());
    assert!(g.group_of("logits").unwrap().blocked.is_some());
}

#[test]
fn resnet20_and_56_option_b_groups() {
    let cfg = ModelConfig::new(3, 10, 32);
    for (name, blocks) in [("resnet20-b", 3), ("resnet56-b", 9)] {
        let g = graph(name, &cfg);
        assert_eq!(g.groups.len(), 3 * blocks + 3 + 2, "{name}");
        let streams = sizes(&g, |x| x.prunable() && !criteria::is_block_inner(&g, x));
        assert_eq!(streams, vec![16, 32, 64], "{name}");
        // stage 1 stream: stem conv+BN, every block's conv2+BN2; read by every block's conv1
        // and by the next stage's first conv and projection
        let s1 = g.group_of("conv1").unwrap();
        let members = g.group_members(s1);
        let producers = members.iter().filter(|m| m.role == Role::Producer).count();
        let consumers = members.iter().filter(|m| m.role == Role::Consumer).count();
        assert_eq!((producers, consumers), (5 * (blocks + 1), blocks + 2), "{name}");
    }
    let g = graph("resnet56", &cfg);
    assert_eq!(g.groups.len(), 27 + 3 + 2);
}

#[test]
fn vgg_small_and_resnet18_groups() {
    let g = graph("vgg-small", &ModelConfig::new(3, 10, 32));
    assert_eq!(sizes(&g, |x| x.prunable()), vec![128, 128, 256, 256, 512, 512]);
    // the classifier reads the last conv's channels flattened with 4x4 positions each
    let last = g.group_of("features.5.conv").unwrap();
    let fc = g.group_members(last).into_iter().find(|m| m.param == "classifier.weight").unwrap();
    assert_eq!((fc.axis, fc.per_channel), (1, 16));
    let g = graph("resnet18", &ModelConfig::new(3, 1000, 224));
    assert_eq!(g.groups.len(), 8 + 4 + 2);
    assert_eq!(
        sizes(&g, |x| x.prunable() && !criteria::is_block_inner(&g, x)),
        vec![64, 128, 256, 512]
    );
    assert_eq!(
        sizes(&g, |x| criteria::is_block_inner(&g, x)),
        vec![64, 64, 128, 128, 256, 256, 512, 512]
    );
}

#[test]
fn bottleneck_resnet50_groups() {
    let g = graph("resnet50", &ModelConfig::new(3, 1000, 224));
    // 16 blocks x 2 inner groups, the stem (its own group: layer1.0 projects 64 -> 256), one
    // residual stream per stage, input and logits
    assert_eq!(g.groups.len(), 32 + 1 + 4 + 2);
    assert_eq!(
        sizes(&g, |x| x.prunable() && !criteria::is_block_inner(&g, x)),
        vec![64, 256, 512, 1024, 2048]
    );
    let inner = sizes(&g, |x| criteria::is_block_inner(&g, x));
    assert_eq!(inner.len(), 32);
    assert_eq!(&inner[..8], &[64, 64, 64, 64, 64, 64, 128, 128]);
    // a stage's stream couples every block's conv3 with the stage's projection shortcut
    let stream = g.group_of("layer3.0.conv3").unwrap();
    assert_eq!(stream.spaces.len(), 6 + 1);
}

/// Random BN statistics and affine parameters, so that masking and pruning are tested on
/// non-trivial normalisations.
fn randomize_bn(vs: &VarStore) {
    let dev = vs.device().clone();
    for nv in vs.all() {
        let t = nv.var.as_tensor();
        if t.rank() != 1 || nv.name.ends_with("fc.bias") || nv.name.ends_with("classifier.bias") {
            continue;
        }
        let r = Tensor::rand(0.2f32, 1.5, t.shape(), &dev).unwrap();
        let v = if nv.name.ends_with("running_mean") || nv.name.ends_with(".bias") {
            (r - 0.8).unwrap()
        } else {
            r
        };
        nv.var.set(&v).unwrap();
    }
}

fn check_pruned_equals_masked(name: &str, cfg: ModelConfig, rate: f64, inner_only: bool) -> (Pruned, VarStore) {
    let dev = Device::Cpu;
    let arch = Arch::from_name(name).unwrap();
    let vs = VarStore::new(7, &dev);
    let dense = arch.build(&cfg, &vs.root(), &StandardFactory).unwrap();
    randomize_bn(&vs);
    let g = arch.graph(&cfg);
    let scores = criteria::l1_scores(&g, &vs).unwrap();
    let sel = criteria::select_lowest(&g, &scores, rate, |x| !inner_only || criteria::is_block_inner(&g, x));
    assert!(sel.count() > 0);
    let pruned = prune_model(&arch, &cfg, &vs, &sel, &StandardFactory).unwrap();
    apply_mask(&g, &vs, &sel).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, cfg.image_size, cfg.image_size), &dev).unwrap();
    let masked = dense.forward_t(&x, false).unwrap();
    let small = pruned.model.forward_t(&x, false).unwrap();
    let diff = (masked.clone() - &small)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = masked.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{name}: pruned and masked outputs differ by {diff} (scale {scale})"
    );
    assert!(pruned.vs.num_params() < vs.num_params());
    (pruned, vs)
}

#[test]
fn pruned_resnet20_equals_masked_and_counts_are_exact() {
    let cfg = ModelConfig::new(3, 10, 32);
    let (pruned, _) = check_pruned_equals_masked("resnet20", cfg, 0.5, true);
    let Arch::CifarResnet { ref mids, widths, .. } = pruned.arch else {
        panic!("not a CIFAR ResNet")
    };
    assert_eq!(widths, [16, 32, 64]);
    assert_eq!(mids, &vec![8, 8, 8, 16, 16, 16, 32, 32, 32]);
    // removing r inner channels of a block with cin -> cout at HxW output removes
    // r (9 cin + 2 + 9 cout) parameters and 9 r (cin + cout) H W multiply-accumulates
    let (params, macs) = count(pruned.model.as_ref(), &cfg, &Device::Cpu).unwrap();
    let (dense_params, dense_macs) = {
        let vs = VarStore::new(0, &Device::Cpu);
        let m = Arch::from_name("resnet20")
            .unwrap()
            .build(&cfg, &vs.root(), &StandardFactory)
            .unwrap();
        count(m.as_ref(), &cfg, &Device::Cpu).unwrap()
    };
    assert_eq!(dense_params, 269_722);
    let mut dp = 0;
    let mut dm = 0u64;
    for (s, (&w, hw)) in [16usize, 32, 64].iter().zip([32usize * 32, 16 * 16, 8 * 8]).enumerate() {
        for b in 0..3 {
            let cin = if s > 0 && b == 0 { w / 2 } else { w };
            let r = w / 2;
            dp += r * (9 * cin + 2 + 9 * w);
            dm += (9 * r * (cin + w) * hw) as u64;
        }
    }
    assert_eq!(params, dense_params - dp);
    assert_eq!(macs, dense_macs - dm);
}

#[test]
fn pruned_option_b_streams_vgg_and_resnet18_equal_masked() {
    check_pruned_equals_masked("resnet20-b", ModelConfig::new(3, 10, 32), 0.4, false);
    let (p, _) = check_pruned_equals_masked("vgg-small", ModelConfig::new(3, 10, 32), 0.5, false);
    assert_eq!(
        p.arch,
        Arch::VggSmall {
            widths: [64, 64, 128, 128, 256, 256]
        }
    );
    check_pruned_equals_masked("resnet18", ModelConfig::new(3, 10, 32), 0.3, false);
}

#[test]
fn pruned_bottleneck_resnet50_equals_masked() {
    // inner widths, stem and residual streams all pruned
    let (p, _) = check_pruned_equals_masked("resnet50", ModelConfig::new(3, 10, 64), 0.3, false);
    let Arch::Resnet {
        stem_width,
        widths,
        ref mids,
        ..
    } = p.arch
    else {
        panic!("not a ResNet")
    };
    assert_eq!(stem_width, 45);
    assert_eq!(widths, [179, 358, 717, 1434]);
    assert_eq!(mids.len(), 32);
    assert_eq!(mids[0], 45);
}

#[test]
fn pruned_models_save_and_load_with_their_new_shapes() {
    let cfg = ModelConfig::new(1, 10, 28);
    let (pruned, _) = check_pruned_equals_masked("resnet32-b", cfg, 0.25, false);
    let dir = std::env::temp_dir().join(format!("cv-pruning-{}", std::process::id()));
    pruned.save(&dir).unwrap();
    let back = Pruned::load(&dir, &cfg, &StandardFactory, &Device::Cpu).unwrap();
    assert_eq!(back.arch, pruned.arch);
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let a = pruned.model.forward_t(&x, false).unwrap();
    let b = back.model.forward_t(&x, false).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    // a weights file that does not match the architecture is rejected by name
    std::fs::write(
        dir.join("arch.json"),
        serde_json::to_vec(&Arch::from_name("resnet32-b").unwrap()).unwrap(),
    )
    .unwrap();
    let e = format!("{:#}", Pruned::load(&dir, &cfg, &StandardFactory, &Device::Cpu).err().unwrap());
    assert!(e.contains("shape") || e.contains("layer"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = DType::F32;
}

#[test]
fn invalid_selections_are_rejected_with_the_reason() {
    let cfg = ModelConfig::new(3, 10, 32);
    let arch = Arch::from_name("resnet20").unwrap();
    let g = arch.graph(&cfg);
    let vs = VarStore::new(0, &Device::Cpu);
    arch.build(&cfg, &vs.root(), &StandardFactory).unwrap();
    let stream = g.group_of("conv1").unwrap().id;
    let inner = g.group_of("layer1.0.conv1").unwrap().id;
    let err = |sel: Selection| format!("{:#}", prune_model(&arch, &cfg, &vs, &sel, &StandardFactory).err().unwrap());
    let sel = |gid: usize, units: Vec<usize>| Selection {
        remove: [(gid, units)].into_iter().collect(),
    };
    assert!(err(sel(stream, vec![0])).contains("option-A"));
    assert!(err(sel(inner, (0..16).collect())).contains("lose all 16"));
    assert!(err(sel(inner, vec![16])).contains("has 16 units"));
    assert!(err(sel(inner, vec![1, 1])).contains("twice"));
    assert!(err(sel(999, vec![0])).contains("no channel group 999"));
    assert!(format!("{:#}", Arch::from_name("lenet5").unwrap_err()).contains("prunable models: resnet20"));
}
