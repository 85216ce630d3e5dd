//! Counting: a per-layer model summary (output shape, parameters, multiply-accumulates), with
//! separate columns for binary operations and additions so binary and adder networks can
//! report what they replace multiplications with.
//!
//! Layers report themselves while a forward pass runs inside [`profile`]; outside of it the
//! recording costs one thread-local check per layer. Counts are per image: profile with a
//! batch of one.

use candle_core::{Result, Tensor};
use serde::Serialize;
use std::cell::RefCell;
use std::fmt;

/// What one layer contributed to a forward pass of one image.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LayerStat {
    /// Full parameter path of the layer (`layer1.0.conv1`).
    pub name: String,
    /// Layer type (`Conv2d`, `Linear`, `BatchNorm`, `BinaryConv2d`, `AdderConv2d`, ...).
    pub kind: String,
    /// Output shape (batch dimension included).
    pub out_shape: Vec<usize>,
    /// Number of float parameters owned by the layer.
    pub params: usize,
    /// Number of binary (1-bit) parameters owned by the layer.
    pub binary_params: usize,
    /// Float multiply-accumulates per image.
    pub macs: u64,
    /// Binary (XNOR-popcount) multiply-accumulates per image.
    pub binary_ops: u64,
    /// Float additions/subtractions that replace multiplications (adder layers) per image.
    pub additions: u64,
}

thread_local! {
    static RECORDER: RefCell<Option<Vec<LayerStat>>> = const { RefCell::new(None) };
}

/// Whether a [`profile`] is running on this thread (layers skip building stats otherwise).
pub fn is_recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// Records a layer's statistics if a [`profile`] is running on this thread.
pub fn record(stat: impl FnOnce() -> LayerStat) {
    RECORDER.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.push(stat());
        }
    })
}

/// Runs `forward` (a forward pass on a batch of one) and collects every layer's statistics.
pub fn profile(forward: impl FnOnce() -> Result<Tensor>) -> Result<(Tensor, ModelSummary)> {
    RECORDER.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = forward();
    let layers = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
    let out = out?;
    Ok((out, ModelSummary { layers }))
}

/// The per-layer table of a model and its totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelSummary {
    pub layers: Vec<LayerStat>,
}

impl ModelSummary {
    pub fn total_params(&self) -> usize {
        self.layers.iter().map(|l| l.params).sum()
    }
    pub fn total_binary_params(&self) -> usize {
        self.layers.iter().map(|l| l.binary_params).sum()
    }
    pub fn total_macs(&self) -> u64 {
        self.layers.iter().map(|l| l.macs).sum()
    }
    pub fn total_binary_ops(&self) -> u64 {
        self.layers.iter().map(|l| l.binary_ops).sum()
    }
    pub fn total_additions(&self) -> u64 {
        self.layers.iter().map(|l| l.additions).sum()
    }
    /// Model size in bytes with float parameters at 32 bits and binary ones at 1 bit.
    pub fn size_bytes(&self) -> f64 {
        self.total_params() as f64 * 4.0 + self.total_binary_params() as f64 / 8.0
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show_bin = self.total_binary_ops() > 0 || self.total_binary_params() > 0;
        let show_add = self.total_additions() > 0;
        write!(f, "{:<32} {:<14} {:<18} {:>12} {:>14}", "layer", "type", "output", "params", "MACs")?;
        if show_bin {
            write!(f, " {:>12} {:>14}", "bin params", "binary ops")?;
        }
        if show_add {
            write!(f, " {:>14}", "additions")?;
        }
        writeln!(f)?;
        for l in &self.layers {
            write!(
                f,
                "{:<32} {:<14} {:<18} {:>12} {:>14}",
                l.name,
                l.kind,
                format!("{:?}", l.out_shape),
                group(l.params as u64),
                group(l.macs)
            )?;
            if show_bin {
                write!(f, " {:>12} {:>14}", group(l.binary_params as u64), group(l.binary_ops))?;
            }
            if show_add {
                write!(f, " {:>14}", group(l.additions))?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "{:<32} {:<14} {:<18} {:>12} {:>14}",
            "total",
            "",
            "",
            group(self.total_params() as u64),
            group(self.total_macs())
        )?;
        if show_bin {
            write!(
                f,
                " {:>12} {:>14}",
                group(self.total_binary_params() as u64),
                group(self.total_binary_ops())
            )?;
        }
        if show_add {
            write!(f, " {:>14}", group(self.total_additions()))?;
        }
        writeln!(f)
    }
}
