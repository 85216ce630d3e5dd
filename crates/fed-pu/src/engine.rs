//! The simulation engine: rounds of client sampling, parallel local training, aggregation,
//! evaluation and checkpointing.
//!
//! ## One round
//! 1. The server samples `clients_per_round` clients without replacement, seeded by
//!    `(seed, round)`, and sorts them by id.
//! 2. It encodes the global weights once into a server [`ModelMessage`].
//! 3. The sampled clients run [`client_update`] in parallel: `workers` threads, each owning a
//!    single-thread rayon pool, take the next client from a shared counter and run it inside
//!    their pool. Each client builds a fresh model from the message, trains `local_epochs`
//!    epochs with SGD on its own samples (batch order seeded by `(seed, round, client, epoch)`)
//!    and replies with its weights and example count into its slot. Since a client's kernels
//!    (whose rayon loops run in that one-thread pool) see one thread whatever `workers` is,
//!    its arithmetic (e.g. how a convolution's weight gradient is split into partial sums)
//!    does not change with `workers`; with the aggregation order fixed by client id, a run
//!    gives bit-identical weights with 1 or 2 workers. (A plain `par_iter` over clients was
//!    tried first: a rayon worker blocked in a nested pool or join steals the next client, so
//!    up to all sampled clients had a model alive at once; the test that counts live models
//!    caught it.)
//! 4. The strategy aggregates the replies in client-id order ([`crate::strategy`]).
//! 5. Optionally the global model is evaluated, then the checkpoint (global weights, round
//!    counter and history in one safetensors file, written atomically) is saved.
//!
//! ## Memory
//! A client is its index list ([`ClientData`]). A model exists only inside [`client_update`],
//! so at most `workers` client models are alive at once (plus the server's global weights and
//! the replies of the round, which are bytes); [`Simulation::max_live_models`] reports the
//! peak. This is the design answer to the usual complaint about simulation engines that keep
//! one actor or model per client: 1,000 clients cost their indices, not 1,000 models.
//!
//! ## Resume
//! Every random choice is a function of `(seed, round, client)` and clients start each round
//! with a fresh optimizer (no state carried between rounds), so the global weights and the
//! round counter are the whole state: a run resumed from round `r` produces the same weights
//! as one that never stopped.

use crate::data::FedDataset;
use crate::loss::{objective_loss, Objective};
use crate::message::{decode_metadata, decode_weights, encode_weights, encode_weights_with_metadata, ModelMessage, Weights};
use crate::partition::ClientData;
use crate::strategy::{weighted_average, Strategy};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use nn_core::rng::{derived, mix_seed};
use nn_core::train::OptimizerConfig;
use nn_core::{Model, VarPath, VarStore};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Builds a model with its variables under the given path.
pub type ModelBuilder = Arc<dyn Fn(&VarPath) -> candle_core::Result<Box<dyn Model>> + Send + Sync>;

const TAG_SAMPLE: u64 = 0x5A4;
const TAG_ORDER: u64 = 0x0D3;

/// Everything that defines a simulation run (besides data and model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FedConfig {
    /// Total rounds.
    pub rounds: usize,
    /// Clients sampled per round (clamped to the number of clients).
    pub clients_per_round: usize,
    /// Local epochs per round.
    pub local_epochs: usize,
    /// Local batch size.
    pub batch_size: usize,
    /// Local SGD learning rate.
    pub lr: f64,
    /// Local SGD momentum (fresh buffers each round).
    pub momentum: f64,
    /// Local L2 weight decay.
    pub weight_decay: f64,
    /// Server strategy.
    pub strategy: Strategy,
    /// Local objective.
    pub objective: Objective,
    /// Seed of initialisation, sampling and batch orders.
    pub seed: u64,
    /// Clients trained in parallel (rayon threads); does not change results.
    pub workers: usize,
    /// Evaluate the global model every this many rounds (0: after the last round only).
    pub eval_every: usize,
}

impl Default for FedConfig {
    fn default() -> Self {
        Self {
            rounds: 10,
            clients_per_round: 10,
            local_epochs: 1,
            batch_size: 64,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            strategy: Strategy::FedAvg,
            objective: Objective::Supervised,
            seed: 0,
            workers: 1,
            eval_every: 0,
        }
    }
}

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round (0-based).
    pub round: usize,
    /// Sampled client ids, increasing.
    pub sampled: Vec<u32>,
    /// Examples trained on (sum over clients and local epochs).
    pub examples: u64,
    /// Mean local training loss, weighted by examples.
    pub train_loss: f64,
    /// Test top-1 (percent) of the new global model, when evaluated.
    pub test_top1: Option<f64>,
    /// Test loss, when evaluated.
    pub test_loss: Option<f64>,
    /// Wall seconds of the round (evaluation excluded, checkpoint included).
    pub wall_s: f64,
    /// Seconds of local training steps (forward, backward, update), summed over clients.
    pub local_compute_s: f64,
    /// Seconds of client setup (model construction, weight decode/encode), summed over clients.
    pub client_setup_s: f64,
    /// Wall seconds of the parallel client phase.
    pub clients_wall_s: f64,
    /// Wall seconds of server work: sampling, encoding the global model, aggregation.
    pub server_s: f64,
    /// Wall seconds of writing the checkpoint.
    pub checkpoint_s: f64,
    /// Wall seconds of evaluation.
    pub eval_s: f64,
}

/// The resumable state of a simulation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimState {
    /// Completed rounds.
    pub round: usize,
    /// One entry per completed round.
    pub history: Vec<RoundMetrics>,
}

/// A federated simulation.
pub struct Simulation {
    cfg: FedConfig,
    data: Arc<FedDataset>,
    test: Option<Arc<FedDataset>>,
    clients: Arc<Vec<ClientData>>,
    builder: ModelBuilder,
    global: Weights,
    state: SimState,
    checkpoint: Option<PathBuf>,
    /// One single-thread rayon pool per worker: the kernels' rayon loops of a client run
    /// inside its worker's pool.
    pools: Vec<rayon::ThreadPool>,
    eval_pool: rayon::ThreadPool,
    live: Arc<AtomicUsize>,
    max_live: Arc<AtomicUsize>,
}

/// Counts live client models (decremented on drop).
struct LiveGuard(Arc<AtomicUsize>);
impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>, max: &Arc<AtomicUsize>) -> Self {
        let now = live.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        LiveGuard(live.clone())
    }
}
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sampled clients of `round`: `k` of `n` without replacement (seeded), increasing.
pub fn sample_clients(n: usize, k: usize, seed: u64, round: usize) -> Vec<u32> {
    let k = k.min(n);
    if k == n {
        return (0..n as u32).collect();
    }
    let mut rng = derived(mix_seed(&[seed, TAG_SAMPLE]), round as u64);
    // partial Fisher-Yates over an id vector: O(n) memory of u32, fine up to millions
    let mut ids: Vec<u32> = (0..n as u32).collect();
    for i in 0..k {
        let j = rng.gen_range(i..n);
        ids.swap(i, j);
    }
    let mut out = ids[..k].to_vec();
    out.sort_unstable();
    out
}

fn weights_of(vs: &VarStore) -> Weights {
    vs.tensors().into_iter().collect()
}

fn to_hashmap(w: &Weights) -> HashMap<String, Tensor> {
    w.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Local training context a client needs besides its data (a real deployment would ship the
/// config with the first message and the model code with the client).
pub struct ClientContext<'a> {
    /// The run configuration.
    pub cfg: &'a FedConfig,
    /// The shared sample pool the client's indices point into.
    pub data: &'a FedDataset,
    /// How to build the model.
    pub builder: &'a ModelBuilder,
}

/// One client's round: decode the server message into a fresh model, train locally, reply.
/// A pure function of the message, the client's data and the configuration.
pub fn client_update(msg: &ModelMessage, client: &ClientData, ctx: &ClientContext<'_>) -> Result<ModelMessage> {
    let cfg = ctx.cfg;
    let t_setup = Instant::now();
    let round = msg.round as usize;
    let vs = VarStore::new(mix_seed(&[cfg.seed, round as u64, client.id as u64]), &Device::Cpu);
    let model = (ctx.builder)(&vs.root())?;
    let global = decode_weights(&msg.weights)?;
    vs.load_tensors(&to_hashmap(&global), true)
        .with_context(|| format!("client {}: loading the server weights", client.id))?;
    let params = vs.trainable();
    let prox: Vec<(candle_core::Var, Tensor)> = if cfg.strategy.mu() > 0.0 {
        params.iter().map(|p| (p.var.clone(), global[&p.name].clone())).collect()
    } else {
        Vec::new()
    };
    let mut opt = OptimizerConfig::Sgd {
        lr: cfg.lr,
        momentum: cfg.momentum,
        nesterov: false,
        weight_decay: cfg.weight_decay,
        no_decay_bias_norm: false,
    }
    .build(params)?;
    drop(global);
    let positions: Vec<usize> = if cfg.objective.labeled_only() {
        (0..client.len()).filter(|&j| client.labeled[j]).collect()
    } else {
        (0..client.len()).collect()
    };
    let mut setup_s = t_setup.elapsed().as_secs_f64();
    let t_compute = Instant::now();
    let (mut loss_sum, mut examples) = (0f64, 0u64);
    for epoch in 0..cfg.local_epochs {
        let mut order = positions.clone();
        let mut rng = derived(mix_seed(&[cfg.seed, TAG_ORDER, round as u64, client.id as u64]), epoch as u64);
        for i in (1..order.len()).rev() {
            let j = rng.gen_range(0..=i);
            order.swap(i, j);
        }
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let idx: Vec<u32> = chunk.iter().map(|&j| client.indices[j]).collect();
            let labels: Vec<u32> = idx.iter().map(|&i| ctx.data.labels[i as usize]).collect();
            let labeled: Vec<bool> = chunk.iter().map(|&j| client.labeled[j]).collect();
            let x = ctx.data.batch(&idx, &Device::Cpu)?;
            let logits = model.forward_t(&x, true)?;
            let loss = objective_loss(&cfg.objective, &logits, &labels, &labeled, &client.positive_classes, &client.priors)?;
            let mut grads = loss.backward()?;
            let mu = cfg.strategy.mu();
            for (var, g0) in &prox {
                // FedProx: gradient of mu/2 * ||w - w_global||^2
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = (g + (var.as_tensor().detach() - g0)?.affine(mu, 0.0)?)?;
                    grads.insert(var.as_tensor(), g);
                }
            }
            opt.step(&grads)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
            examples += chunk.len() as u64;
        }
    }
    let compute_s = t_compute.elapsed().as_secs_f64();
    let t_enc = Instant::now();
    let weights = encode_weights(&weights_of(&vs))?;
    drop(model);
    drop(vs);
    setup_s += t_enc.elapsed().as_secs_f64();
    let mut metrics = BTreeMap::new();
    metrics.insert("train_loss".into(), if examples > 0 { loss_sum / examples as f64 } else { 0.0 });
    metrics.insert("compute_s".into(), compute_s);
    metrics.insert("setup_s".into(), setup_s);
    // FedAvg weight: samples the client trains on per epoch
    Ok(ModelMessage {
        round: msg.round,
        sender: Some(client.id),
        num_examples: positions.len() as u64,
        weights,
        metrics,
    })
}

/// Top-1 (percent) and mean cross-entropy of `weights` on `ds`, in batches of `batch`.
pub fn evaluate(builder: &ModelBuilder, weights: &Weights, ds: &FedDataset, batch: usize) -> Result<(f64, f64)> {
    let vs = VarStore::new(0, &Device::Cpu);
    let model = builder(&vs.root())?;
    vs.load_tensors(&to_hashmap(weights), true)?;
    let (mut correct, mut loss) = (0usize, 0f64);
    let all: Vec<u32> = (0..ds.len() as u32).collect();
    for chunk in all.chunks(batch.max(1)) {
        let x = ds.batch(chunk, &Device::Cpu)?;
        let logits = model.forward_t(&x, false)?.detach();
        let y: Vec<u32> = chunk.iter().map(|&i| ds.labels[i as usize]).collect();
        let yt = Tensor::new(y.as_slice(), &Device::Cpu)?;
        loss += nn_core::train::cross_entropy(&logits, &yt, 0.0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * chunk.len() as f64;
        correct += nn_core::train::topk_correct(&logits, &yt, 1)?;
    }
    let n = ds.len().max(1) as f64;
    Ok((100.0 * correct as f64 / n, loss / n))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

impl Simulation {
    /// A simulation over `clients` (index lists into `data`), the global model initialised by
    /// `builder` with `cfg.seed`. `test`, when given, is used for evaluation.
    pub fn new(
        cfg: FedConfig,
        data: Arc<FedDataset>,
        test: Option<Arc<FedDataset>>,
        clients: Vec<ClientData>,
        builder: ModelBuilder,
    ) -> Result<Self> {
        if clients.is_empty() {
            bail!("a simulation needs at least one client");
        }
        if cfg.workers == 0 || cfg.batch_size == 0 || cfg.clients_per_round == 0 {
            bail!("workers, batch size and clients per round must be >= 1");
        }
        for c in &clients {
            if c.labeled.len() != c.indices.len() {
                bail!("client {}: {} indices but {} labeled flags", c.id, c.indices.len(), c.labeled.len());
            }
            if let Some(&i) = c.indices.iter().find(|&&i| i as usize >= data.len()) {
                bail!("client {}: index {i} is outside the dataset ({} samples)", c.id, data.len());
            }
        }
        let vs = VarStore::new(cfg.seed, &Device::Cpu);
        let model = builder(&vs.root())?;
        drop(model);
        let global = weights_of(&vs);
        let pools = (0..cfg.workers)
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let eval_pool = rayon::ThreadPoolBuilder::new().num_threads(cfg.workers).build()?;
        Ok(Self {
            cfg,
            data,
            test,
            clients: Arc::new(clients),
            builder,
            global,
            state: SimState::default(),
            checkpoint: None,
            pools,
            eval_pool,
            live: Arc::new(AtomicUsize::new(0)),
            max_live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Saves a checkpoint to `path` after every round.
    pub fn with_checkpoint(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint = Some(path.into());
        self
    }

    /// The configuration.
    pub fn config(&self) -> &FedConfig {
        &self.cfg
    }
    /// The global model's weights.
    pub fn global_weights(&self) -> &Weights {
        &self.global
    }
    /// Completed rounds and their metrics.
    pub fn state(&self) -> &SimState {
        &self.state
    }
    /// The clients.
    pub fn clients(&self) -> &[ClientData] {
        &self.clients
    }
    /// The most client models that were alive at the same time so far.
    pub fn max_live_models(&self) -> usize {
        self.max_live.load(Ordering::SeqCst)
    }

    /// Writes the checkpoint now (global weights + state, one atomic file).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "fed-pu-checkpoint/1".to_string());
        meta.insert("round".to_string(), self.state.round.to_string());
        meta.insert("state".to_string(), serde_json::to_string(&self.state)?);
        meta.insert("config".to_string(), serde_json::to_string(&self.cfg)?);
        let bytes = encode_weights_with_metadata(&self.global, &meta)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(path, &bytes)
    }

    /// Loads the checkpoint at the configured path, if it exists. The stored configuration
    /// must match this one except for `rounds`, `workers` and `eval_every` (which may change
    /// on resume). Returns whether a checkpoint was loaded.
    pub fn resume(&mut self) -> Result<bool> {
        let Some(path) = self.checkpoint.clone() else { return Ok(false) };
        if !path.exists() {
            return Ok(false);
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let meta = decode_metadata(&bytes)?;
        if meta.get("format").map(String::as_str) != Some("fed-pu-checkpoint/1") {
            bail!("{} is not a fed-pu checkpoint", path.display());
        }
        let stored: FedConfig = serde_json::from_str(meta.get("config").context("checkpoint lacks its config")?)?;
        let norm = |c: &FedConfig| FedConfig {
            rounds: 0,
            workers: 1,
            eval_every: 0,
            ..c.clone()
        };
        if norm(&stored) != norm(&self.cfg) {
            bail!("{} was written by a different configuration: {:?}", path.display(), stored);
        }
        let state: SimState = serde_json::from_str(meta.get("state").context("checkpoint lacks its state")?)?;
        let w = decode_weights(&bytes)?;
        if w.len() != self.global.len()
            || w.iter()
                .any(|(k, t)| self.global.get(k).map(|g| g.dims() != t.dims()).unwrap_or(true))
        {
            bail!("{}: weights do not match the model", path.display());
        }
        self.global = w;
        self.state = state;
        Ok(true)
    }

    fn eval_due(&self, round: usize) -> bool {
        let last = round + 1 == self.cfg.rounds;
        last || (self.cfg.eval_every > 0 && (round + 1) % self.cfg.eval_every == 0)
    }

    /// Runs the next round and returns its metrics.
    pub fn run_round(&mut self) -> Result<RoundMetrics> {
        let round = self.state.round;
        let t0 = Instant::now();
        let sampled = sample_clients(self.clients.len(), self.cfg.clients_per_round, self.cfg.seed, round);
        let msg = ModelMessage {
            round: round as u64,
            sender: None,
            num_examples: 0,
            weights: encode_weights(&self.global)?,
            metrics: BTreeMap::new(),
        };
        let mut server_s = t0.elapsed().as_secs_f64();
        let t_clients = Instant::now();
        let ctx = ClientContext {
            cfg: &self.cfg,
            data: &self.data,
            builder: &self.builder,
        };
        let (live, max_live, clients) = (&self.live, &self.max_live, &self.clients);
        let next = AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<Result<ModelMessage>>>> = sampled.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for pool in &self.pools {
                let (next, slots, sampled, msg, ctx) = (&next, &slots, &sampled, &msg, &ctx);
                scope.spawn(move || {
                    pool.install(|| loop {
                        let pos = next.fetch_add(1, Ordering::SeqCst);
                        if pos >= sampled.len() {
                            break;
                        }
                        let _g = LiveGuard::new(live, max_live);
                        let r = client_update(msg, &clients[sampled[pos] as usize], ctx);
                        *slots[pos].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    })
                });
            }
        });
        let replies: Vec<Result<ModelMessage>> = slots
            .into_iter()
            .map(|s| {
                s.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(anyhow::anyhow!("a client did not reply")))
            })
            .collect();
        let clients_wall_s = t_clients.elapsed().as_secs_f64();
        let t_agg = Instant::now();
        let mut decoded = Vec::with_capacity(replies.len());
        let (mut compute, mut setup, mut loss, mut examples) = (0f64, 0f64, 0f64, 0u64);
        for r in replies {
            let r = r?;
            compute += r.metrics.get("compute_s").copied().unwrap_or(0.0);
            setup += r.metrics.get("setup_s").copied().unwrap_or(0.0);
            let n = r.num_examples * self.cfg.local_epochs as u64;
            loss += r.metrics.get("train_loss").copied().unwrap_or(0.0) * n as f64;
            examples += n;
            decoded.push((r.num_examples, r.decode()?));
        }
        self.global = weighted_average(&decoded)?;
        drop(decoded);
        server_s += t_agg.elapsed().as_secs_f64();
        self.state.round += 1;
        let wall_before_ckpt = t0.elapsed().as_secs_f64();
        let mut m = RoundMetrics {
            round,
            sampled,
            examples,
            train_loss: if examples > 0 { loss / examples as f64 } else { 0.0 },
            test_top1: None,
            test_loss: None,
            wall_s: 0.0,
            local_compute_s: compute,
            client_setup_s: setup,
            clients_wall_s,
            server_s,
            checkpoint_s: 0.0,
            eval_s: 0.0,
        };
        if self.eval_due(round) {
            if let Some(test) = &self.test {
                let t = Instant::now();
                let (builder, global) = (&self.builder, &self.global);
                let (top1, tl) = self.eval_pool.install(|| evaluate(builder, global, test, 500))?;
                m.test_top1 = Some(top1);
                m.test_loss = Some(tl);
                m.eval_s = t.elapsed().as_secs_f64();
            }
        }
        self.state.history.push(m.clone());
        if let Some(path) = self.checkpoint.clone() {
            let t = Instant::now();
            self.save_checkpoint(&path)?;
            let cs = t.elapsed().as_secs_f64();
            let last = self.state.history.last_mut().expect("pushed");
            last.checkpoint_s = cs;
            m.checkpoint_s = cs;
        }
        m.wall_s = wall_before_ckpt + m.checkpoint_s;
        self.state.history.last_mut().expect("pushed").wall_s = m.wall_s;
        Ok(m)
    }

    /// Runs rounds until `cfg.rounds` are complete (continuing after [`Simulation::resume`]),
    /// calling `on_round` after each.
    pub fn run(&mut self, mut on_round: impl FnMut(&RoundMetrics)) -> Result<&SimState> {
        while self.state.round < self.cfg.rounds {
            let m = self.run_round()?;
            on_round(&m);
        }
        Ok(&self.state)
    }

    /// Evaluates the current global model on `ds`: (top-1 percent, mean cross-entropy).
    pub fn evaluate(&self, ds: &FedDataset) -> Result<(f64, f64)> {
        self.eval_pool.install(|| evaluate(&self.builder, &self.global, ds, 500))
    }
}
