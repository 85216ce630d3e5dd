//! PiT, the pooling-based vision transformer (Heo et al. 2021): a strided convolutional patch
//! embedding and three stages whose spatial size halves and width doubles, through a
//! depthwise (channel-multiplier 2) 3x3 stride-2 convolution on the tokens and a linear layer
//! on the class token.

use crate::layers::{
    check_input, conv2d, conv_forward, conv_macs, drop_path_rate, flatten_tokens, param, tokens_to_map, Block, LayerNorm, Linear, TRUNC_002,
};
use crate::registry::{ModelOptions, ZooModel};
use candle_core::{Result, Tensor, Var};
use nn_core::layers::{Conv2d, Conv2dConfig};
use nn_core::{Model, ParamKind, VarPath};

/// Hyper-parameters of a PiT.
#[derive(Debug, Clone, PartialEq)]
pub struct PitConfig {
    pub patch_size: usize,
    pub stride: usize,
    pub base_dims: Vec<usize>,
    pub depth: Vec<usize>,
    pub heads: Vec<usize>,
    pub mlp_ratio: f64,
}

impl PitConfig {
    /// PiT-Ti: 16x16 patches at stride 8, widths 64-128-256, depths 2-6-4.
    pub fn ti() -> Self {
        Self {
            patch_size: 16,
            stride: 8,
            base_dims: vec![32, 32, 32],
            depth: vec![2, 6, 4],
            heads: vec![2, 4, 8],
            mlp_ratio: 4.0,
        }
    }
}

/// Token pooling between stages.
pub struct Pooling {
    pub conv: Conv2d,
    pub fc: Linear,
}

/// One PiT stage.
pub struct PitStage {
    pub pool: Option<Pooling>,
    pub blocks: Vec<Block>,
}

/// PiT.
pub struct Pit {
    name: String,
    pub patch_embed: Conv2d,
    pub pos_embed: Var,
    pub cls_token: Var,
    pub transformers: Vec<PitStage>,
    pub norm: LayerNorm,
    pub head: Linear,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
    num_features: usize,
}

impl Pit {
    pub fn new(name: &str, vp: &VarPath, cfg: &PitConfig, o: &ModelOptions) -> Result<Self> {
        if o.image_size < cfg.patch_size {
            candle_core::bail!(
                "{name}: image size {} is smaller than the patch size {}",
                o.image_size,
                cfg.patch_size
            );
        }
        let dims: Vec<usize> = cfg.base_dims.iter().zip(&cfg.heads).map(|(b, h)| b * h).collect();
        let pcfg = Conv2dConfig::new(o.in_chans, dims[0], cfg.patch_size)
            .stride(cfg.stride)
            .padding(0)
            .bias(true);
        let patch_embed = conv2d(&vp.pp("patch_embed").pp("conv"), pcfg)?;
        let (g, _) = pcfg.output_hw(o.image_size, o.image_size);
        let pos_embed = param(vp, "pos_embed", &[1, dims[0], g, g], TRUNC_002, ParamKind::Embedding)?;
        let cls_token = param(vp, "cls_token", &[1, 1, dims[0]], TRUNC_002, ParamKind::Embedding)?;
        let total: usize = cfg.depth.iter().sum();
        let mut k = 0;
        let mut transformers = Vec::new();
        for i in 0..dims.len() {
            let tp = vp.pp("transformers").pp(i);
            let pool = if i > 0 {
                let (cin, cout) = (dims[i - 1], dims[i]);
                let p = tp.pp("pool");
                Some(Pooling {
                    conv: conv2d(
                        &p.pp("conv"),
                        Conv2dConfig::new(cin, cout, 3).stride(2).padding(1).groups(cin).bias(true),
                    )?,
                    fc: Linear::new(&p.pp("fc"), cin, cout, true)?,
                })
            } else {
                None
            };
            let blocks = (0..cfg.depth[i])
                .map(|j| {
                    Block::new(
                        &tp.pp("blocks").pp(j),
                        dims[i],
                        cfg.heads[i],
                        cfg.mlp_ratio,
                        true,
                        1e-6,
                        drop_path_rate(o.drop_path_rate, k + j, total),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            k += cfg.depth[i];
            transformers.push(PitStage { pool, blocks });
        }
        let last = *dims.last().expect("stages");
        Ok(Self {
            name: name.to_string(),
            patch_embed,
            pos_embed,
            cls_token,
            transformers,
            norm: LayerNorm::new(&vp.pp("norm"), last, 1e-6)?,
            head: Linear::new(&vp.pp("head"), last, o.num_classes, true)?,
            image_size: o.image_size,
            in_chans: o.in_chans,
            num_classes: o.num_classes,
            num_features: last,
        })
    }

    /// Feature maps after each stage and the final (normalised) class token.
    fn run(&self, x: &Tensor, train: bool) -> Result<(Vec<Tensor>, Tensor)> {
        check_input(&self.name, x, self.in_chans, self.image_size)?;
        let b = x.dims()[0];
        let mut x = conv_forward(&self.patch_embed, x)?.broadcast_add(self.pos_embed.as_tensor())?;
        let d0 = self.cls_token.dims()[2];
        let mut cls = self.cls_token.as_tensor().broadcast_as((b, 1, d0))?.contiguous()?;
        let mut maps = Vec::new();
        for st in &self.transformers {
            if let Some(p) = &st.pool {
                x = conv_forward(&p.conv, &x)?;
                cls = p.fc.forward(&cls)?;
            }
            let (h, w) = (x.dims()[2], x.dims()[3]);
            let mut t = Tensor::cat(&[&cls, &flatten_tokens(&x)?], 1)?;
            for blk in &st.blocks {
                t = blk.forward(&t, train)?;
            }
            cls = t.narrow(1, 0, 1)?;
            x = tokens_to_map(&t.narrow(1, 1, h * w)?, h, w)?;
            maps.push(x.clone());
        }
        Ok((maps, self.norm.forward(&cls)?.get_on_dim(1, 0)?))
    }

    pub fn macs(&self) -> u64 {
        let (mut m, mut h, mut w) = conv_macs(&self.patch_embed, self.image_size, self.image_size);
        for st in &self.transformers {
            if let Some(p) = &st.pool {
                let (cm, oh, ow) = conv_macs(&p.conv, h, w);
                m += cm + p.fc.macs(1);
                (h, w) = (oh, ow);
            }
            m += st.blocks.iter().map(|b| b.macs(h * w + 1)).sum::<u64>();
        }
        m + self.head.macs(1)
    }
}

impl Model for Pit {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.run(x, train)?.1)
    }
    fn forward_head(&self, f: &Tensor, _train: bool) -> Result<Tensor> {
        self.head.forward(f)
    }
    /// The three stage maps `[B, C_i, H_i, W_i]`, then the class-token features.
    fn forward_stages(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let (mut maps, f) = self.run(x, train)?;
        maps.push(f);
        Ok(maps)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn num_features(&self) -> usize {
        self.num_features
    }
}

impl ZooModel for Pit {
    fn macs(&self) -> u64 {
        Pit::macs(self)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
}
