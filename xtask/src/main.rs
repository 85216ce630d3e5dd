//! `cargo xtask <command>`: the experiments, benchmarks and data checks of compact-vision.
//! The cargo alias builds it with `--release`: the kernels are far too slow to train with in
//! a debug build.
//!
//! ## Why each dependency is here
//! - the eight workspace crates: the methods whose experiments this runs.
//! - `candle-core`: devices and tensors where a command builds inputs itself.
//! - `clap`: the command line; `anyhow`: errors that name the flag, file or run that failed.
//! - `serde`, `serde_json`: run configurations, `summary.json` and search state.
//! - `rand`: seeded shuffles and subsets; `rayon`: the thread count reported by the benchmarks.
//! - `image`: the JPEG class folders written for the ImageNet-layout preset checks.

mod adder;
mod bnn;
mod bnn_deploy;
mod cli;
mod fedpu;
mod grid;
mod nas;
mod nn;
mod prune;
mod sfda;
mod test_files;
mod vit;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "compact-vision experiments, benchmarks and data checks",
    arg_required_else_help = true
)]
struct Cli {
    /// Worker threads for the CPU kernels and the loader (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a dataset (nn-core backbones), writing runs/<name>/ and docs/results.
    Train(nn::TrainArgs),
    /// The main job: a few minutes on the embedded MNIST showing the workspace end to end.
    Demo(nn::DemoArgs),
    /// List every dataset the project knows, where it was found and whether checksums match.
    Data {
        /// Search this directory first.
        #[arg(long)]
        data: Option<std::path::PathBuf>,
    },
    /// Benchmarks that print ratios against baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        which: nn::BenchCommand,
    },
    /// Print a model's per-layer summary (output shapes, parameters, MACs).
    Summary {
        #[arg(long, default_value = "resnet20")]
        model: String,
        /// Input channels, classes and image size come from this dataset's usual shapes.
        #[arg(long, default_value = "cifar10")]
        dataset: String,
    },
    /// List the models, datasets and named training presets.
    List,
    /// Binary networks (bnn-core): train with a quantizer, LNS fine-tuning, BiMLP.
    Bnn {
        #[command(subcommand)]
        which: bnn::BnnCommand,
    },
    /// Structural pruning (pruning crate): SCOP, ManiDP, L1-norm and random, fine-tuning,
    /// speed of the physically pruned models.
    Prune {
        #[command(subcommand)]
        which: prune::PruneCommand,
    },
    /// Source-free domain adaptation (domain-adapt): source-only, SHOT-IM and SFDA-DE.
    Sfda(sfda::SfdaArgs),
    /// Federated learning with positive and unlabeled data (fed-pu): runs, the FedPU grid, the scale benchmark.
    Fedpu {
        #[command(subcommand)]
        which: fedpu::FedPuCommand,
    },
    /// AdderNet and PKKD (adder-nets): benchmark, training runs, CNN/ANN/PKKD comparison.
    Adder {
        #[command(subcommand)]
        which: adder::AdderCommand,
    },
    /// DC-NAS architecture search (nas): supernet, ranking study, searches, presets.
    Nas {
        #[command(subcommand)]
        which: nas::NasCommand,
    },
    /// Vision transformers of the survey (vit-survey-zoo): list, summary, train, bench.
    Vit {
        #[command(subcommand)]
        which: vit::VitCommand,
    },
}

/// Freed blocks of 32 MiB and more (above glibc's largest mmap threshold, so otherwise
/// unmapped on free and faulted in again on the next step) are kept for reuse, up to 1 GiB.
#[global_allocator]
static ALLOC: nn_core::alloc::LargeBlockCache = nn_core::alloc::LargeBlockCache::new(32 << 20, 1 << 30);

fn main() -> Result<()> {
    nn_core::runtime::tune();
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        nn_core::runtime::set_threads(t)?;
    }
    match cli.command {
        Command::Train(a) => nn::train(a),
        Command::Demo(a) => nn::demo(a),
        Command::Data { data } => {
            print!("{}", nn_core::data::registry::report_table(data.as_deref()));
            Ok(())
        }
        Command::Bench { which } => nn::bench(which),
        Command::Summary { model, dataset } => nn::summary(&model, &dataset),
        Command::List => nn::list(),
        Command::Bnn { which } => bnn::run(which),
        Command::Prune { which } => prune::run(which),
        Command::Sfda(a) => sfda::run(a),
        Command::Fedpu { which } => fedpu::run(which),
        Command::Adder { which } => adder::run(which),
        Command::Nas { which } => nas::run(which),
        Command::Vit { which } => vit::run(which),
    }
}
