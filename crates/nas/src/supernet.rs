//! The weight-sharing supernet, trained by uniform single-path sampling (one random
//! sub-network per optimizer step, as in single-path one-shot NAS), and extraction of a
//! sub-network's weights.

use crate::net::Network;
use crate::space::{Arch, SearchSpace};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use nn_core::rng::{derived, mix_seed};
use nn_core::train::{BatchSource, Callback, FitContext, StepContext, TrainConfig, TrainSummary, Trainer};
use nn_core::{Model, VarStore};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// File name of the trained supernet weights inside its run directory.
pub const WEIGHTS_FILE: &str = "supernet.safetensors";

/// A supernet with its variables and a copy of its initial weights (the reference of the
/// "change" features).
pub struct Supernet {
    pub space: SearchSpace,
    pub vs: VarStore,
    pub net: Network,
    /// Variables right after initialisation (a function of `seed`).
    pub init: HashMap<String, Tensor>,
    pub seed: u64,
}

impl Supernet {
    /// A freshly initialised supernet (weights drawn from `seed`).
    pub fn new(space: &SearchSpace, seed: u64, device: &Device) -> Result<Self> {
        let vs = VarStore::new(seed, device);
        let net = Network::supernet(&vs.root(), space)?;
        let init = vs.tensors();
        Ok(Self {
            space: space.clone(),
            vs,
            net,
            init,
            seed,
        })
    }

    /// Loads trained weights saved by [`Supernet::save`] (initial weights come from `seed`).
    pub fn load(space: &SearchSpace, seed: u64, device: &Device, weights: &Path) -> Result<Self> {
        let s = Self::new(space, seed, device)?;
        s.vs.load(weights)
            .with_context(|| format!("loading supernet weights {}", weights.display()))?;
        Ok(s)
    }

    /// Saves the trained weights (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(self.vs.save(path)?)
    }

    /// The sub-network of `arch` as a stand-alone model in a new store, its weights copied from
    /// the supernet (`from_init`: from the initial weights), each tensor sliced to the leading
    /// channels the sub-network uses. `bn_momentum` 1.0 makes one training-mode pass set the
    /// BatchNorm statistics (recalibration).
    pub fn extract(&self, arch: &Arch, from_init: bool, bn_momentum: f64) -> Result<(Network, VarStore)> {
        let vs = VarStore::new(0, self.vs.device());
        let net = Network::standalone_with_momentum(&vs.root(), &self.space, arch, bn_momentum)?;
        let source = if from_init { None } else { Some(self.vs.tensors()) };
        let mut values = HashMap::new();
        for v in vs.all() {
            let t = match &source {
                Some(s) => s.get(&v.name),
                None => self.init.get(&v.name),
            }
            .with_context(|| format!("supernet has no variable `{}`", v.name))?;
            let mut t = t.clone();
            for (d, &n) in v.var.dims().iter().enumerate() {
                if t.dims()[d] < n {
                    anyhow::bail!("`{}`: sub-network needs {:?}, supernet has {:?}", v.name, v.var.dims(), t.dims());
                }
                if t.dims()[d] > n {
                    t = t.narrow(d, 0, n)?;
                }
            }
            values.insert(v.name.clone(), t.contiguous()?);
        }
        vs.load_tensors(&values, true)?;
        Ok((net, vs))
    }
}

/// The supernet as an nn-core [`Model`] whose forward pass runs the current path; the
/// [`PathSampler`] callback sets a new uniformly random path before every step.
pub struct SupernetModel<'a> {
    pub net: &'a Network,
    path: Mutex<Arch>,
}

impl<'a> SupernetModel<'a> {
    pub fn new(net: &'a Network, path: Arch) -> Self {
        Self {
            net,
            path: Mutex::new(path),
        }
    }
    /// The path the next forward pass runs.
    pub fn path(&self) -> Arch {
        self.path.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_path(&self, a: Arch) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = a;
    }
}

impl Model for SupernetModel<'_> {
    fn name(&self) -> &str {
        Model::name(self.net)
    }
    fn forward_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.net.forward_path(x, &self.path(), train, false)?.0)
    }
    fn forward_head(&self, f: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.net.head_forward(f, train)
    }
    fn num_classes(&self) -> usize {
        self.net.space.num_classes
    }
    fn num_features(&self) -> usize {
        self.net.num_features()
    }
}

/// The path of global step `step`: a pure function of `(seed, step)`, so a resumed supernet
/// run samples the same paths as an uninterrupted one.
pub fn path_at(space: &SearchSpace, seed: u64, step: usize) -> Arch {
    space.sample(&mut derived(mix_seed(&[seed, 0x5a4d]), step as u64))
}

/// Sets the sampled path before each step.
pub struct PathSampler<'a> {
    pub model: &'a SupernetModel<'a>,
    pub seed: u64,
}

impl Callback for PathSampler<'_> {
    fn name(&self) -> String {
        "nas-path-sampler".into()
    }
    fn on_fit_begin(&mut self, ctx: &FitContext) -> anyhow::Result<()> {
        self.model
            .set_path(path_at(&self.model.net.space, self.seed, ctx.state.global_step));
        Ok(())
    }
    fn on_step_end(&mut self, step: &StepContext, _loss: f64) -> anyhow::Result<()> {
        self.model.set_path(path_at(&self.model.net.space, self.seed, step.global_step + 1));
        Ok(())
    }
}

/// Trains the supernet with nn-core's trainer (checkpoints and exact resume in
/// `config.out_dir`), one uniformly sampled path per step; saves the weights to
/// `out_dir/supernet.safetensors`.
pub fn train_supernet(sn: &Supernet, config: TrainConfig, train: &dyn BatchSource) -> Result<TrainSummary> {
    let out = config.out_dir.clone();
    let model = SupernetModel::new(&sn.net, path_at(&sn.space, sn.seed, 0));
    let mut sampler = PathSampler {
        model: &model,
        seed: sn.seed,
    };
    let mut trainer = Trainer::new(config, &model, &sn.vs)?.with_callback(&mut sampler);
    let summary = trainer.fit(train, None)?;
    if summary.completed {
        sn.save(&out.join(WEIGHTS_FILE))?;
    }
    Ok(summary)
}
