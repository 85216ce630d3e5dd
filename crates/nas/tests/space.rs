//! Architectures: encoding, JSON, validation, and building (28x28 and 32x32 shape checks).

mod common;

use candle_core::{Device, Tensor};
use nas::net::Network;
use nas::space::{Arch, LayerChoice, Op, SearchSpace};
use nn_core::rng::seeded;
use nn_core::{Model, VarStore};

#[test]
fn encode_decode_and_json_roundtrip() {
    let space = SearchSpace::small("s", 3, 32, 10);
    let mut rng = seeded(3);
    for _ in 0..50 {
        let a = space.sample(&mut rng);
        let code = space.encode(&a).unwrap();
        assert_eq!(space.decode(&code).unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        let b: Arch = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key(), b.key());
    }
    let a: Arch = serde_json::from_str(
        r#"{"layers":[{"op":"conv3","width":1.0},{"op":"skip","width":1.0},{"op":"ir_e6_k5","width":0.5},
        {"op":"conv7","width":0.75},{"op":"ir_e1_k3","width":1.0},{"op":"ir_e3_k3","width":1.0},{"op":"skip","width":1.0},{"op":"conv5","width":0.5}]}"#,
    )
    .unwrap();
    space.validate(&a).unwrap();
    assert_eq!(a.layers[2].op, Op::InvRes { expand: 6, k: 5 });
    assert!(a.key().starts_with("conv3@1|skip|ir_e6_k5@0.5"), "{}", a.key());
    // The first layer of a stage changes resolution: no skip there.
    let mut bad = a.clone();
    bad.layers[2] = LayerChoice { op: Op::Skip, width: 1.0 };
    assert!(space.validate(&bad).unwrap_err().to_string().contains("cannot be skipped"));
    assert!(Op::parse("ir_e4").is_err());
    assert!(space.size() > 1e6);
}

#[test]
fn architectures_build_for_28_and_32_pixel_inputs() {
    for (c, size) in [(1usize, 28usize), (3, 32)] {
        let space = SearchSpace::small("s", c, size, 10);
        let mut rng = seeded(size as u64);
        let x = Tensor::randn(0f32, 1.0, (2, c, size, size), &Device::Cpu).unwrap();
        for _ in 0..4 {
            let a = space.sample(&mut rng);
            let vs = VarStore::new(0, &Device::Cpu);
            let net = Network::standalone(&vs.root(), &space, &a).unwrap();
            assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 10]);
            let (_, outs) = net.forward_path(&x, &a, false, true).unwrap();
            assert_eq!(outs.len(), 8);
            // 16 channels at full res, then /2 and /4 with the chosen widths.
            let last = outs.last().unwrap().dims().to_vec();
            assert_eq!(last[2], size.div_ceil(4), "{:?}", a.key());
            let w = a.layers[7];
            let expect = if w.op == Op::Skip {
                outs[6].dims()[1]
            } else {
                space.channels(7, w.width)
            };
            assert_eq!(last[1], expect);
            let (_, s) = nn_core::summary::profile(|| net.forward_t(&x.narrow(0, 0, 1)?, false)).unwrap();
            assert!(s.total_macs() > 0);
            assert_eq!(s.total_params(), vs.num_params(), "every parameter is counted once");
        }
        // The supernet runs any path.
        let vs = VarStore::new(0, &Device::Cpu);
        let sn = Network::supernet(&vs.root(), &space).unwrap();
        let a = space.sample(&mut rng);
        assert_eq!(sn.forward_arch(&x, &a, true).unwrap().dims(), &[2, 10]);
        let vs2 = VarStore::new(0, &Device::Cpu);
        Network::standalone(&vs2.root(), &space, &a).unwrap();
        assert!(vs.num_params() > 5 * vs2.num_params());
    }
}

#[test]
fn imagenet_space_builds_a_mobilenet_v2_like_network() {
    let space = SearchSpace::imagenet_mbv2(1000);
    assert_eq!(space.slots.len(), 21);
    let a = Arch {
        layers: (0..21)
            .map(|_| LayerChoice {
                op: Op::InvRes { expand: 6, k: 3 },
                width: 1.0,
            })
            .collect(),
    };
    let vs = VarStore::new(0, &Device::Cpu);
    let net = Network::standalone(&vs.root(), &space, &a).unwrap();
    // MobileNetV2-size (3.5M in the original with 17 blocks and expansion 1 first block).
    let p = vs.num_params();
    assert!((3_000_000..6_000_000).contains(&p), "{p}");
    assert_eq!(net.num_features(), 1280);
}
