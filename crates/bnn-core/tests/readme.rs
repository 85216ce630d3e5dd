//! The README example, compiled and run.

use bnn_core::{BinaryConfig, BinaryFactory};
use candle_core::{Device, Result, Tensor};
use nn_core::{layers::Conv2dConfig, LayerFactory, LayerRole, VarStore};

#[test]
fn readme_example_builds_float_stem_binary_body_float_head() -> Result<()> {
    let vs = VarStore::new(0, &Device::Cpu);
    let f = BinaryFactory::new(BinaryConfig::from_method("fda-noise")?);
    let stem = f.conv2d(&vs.root().pp("stem"), Conv2dConfig::new(3, 32, 3), LayerRole::Stem)?;
    let body = f.conv2d(&vs.root().pp("body"), Conv2dConfig::new(32, 32, 3), LayerRole::Body)?;
    let act = f.activation(&vs.root().pp("act"), nn_core::layers::Activation::Relu, 32, LayerRole::Body)?;
    let head = f.linear(&vs.root().pp("fc"), 32, 10, true, LayerRole::Head)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
    let run = || -> Result<Tensor> {
        let y = act.forward_t(&body.forward_t(&stem.forward_t(&x, false)?, false)?, false)?;
        head.forward_t(&y.mean((2, 3))?, false)
    };
    let (y, s) = nn_core::summary::profile(run)?;
    assert_eq!(y.dims(), &[2, 10]);
    let kinds: Vec<&str> = s.layers.iter().map(|l| l.kind.as_str()).collect();
    assert_eq!(kinds, ["Conv2d", "BinaryConv2d", "PReLU", "Linear"]);
    assert_eq!(s.total_binary_params(), 32 * 32 * 9);
    Ok(())
}
