//! The one message type server and clients exchange, with model weights as safetensors bytes.
//!
//! The simulation passes [`ModelMessage`]s in memory, but nothing in them refers to the
//! process: a client function that maps a server message and its local data to a reply
//! ([`crate::engine::client_update`]) could run behind any transport that moves bytes.
//!
//! Weights are encoded in the safetensors layout (8-byte little-endian header length, a JSON
//! header naming each tensor's dtype, shape and byte range, then the raw little-endian data;
//! tensor names sorted so equal weights give equal bytes). Everything is stored as `F32`.
//! Decoding goes through candle's own safetensors reader, so the bytes are checked by an
//! independent implementation of the format.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A model's variables by name, in name order (the order aggregation runs in).
pub type Weights = BTreeMap<String, Tensor>;

/// One message between server and client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMessage {
    /// The round the message belongs to (0-based).
    pub round: u64,
    /// `None` from the server, `Some(client id)` from a client.
    pub sender: Option<u32>,
    /// Examples the weights were trained on (FedAvg weight); 0 from the server.
    pub num_examples: u64,
    /// Model weights, safetensors bytes ([`encode_weights`]).
    pub weights: Vec<u8>,
    /// Scalar metrics (client: `train_loss`, `compute_s`, `setup_s`, ...).
    pub metrics: BTreeMap<String, f64>,
}

impl ModelMessage {
    /// The decoded weights (on the CPU).
    pub fn decode(&self) -> Result<Weights> {
        decode_weights(&self.weights)
    }
}

/// Encodes `weights` as safetensors bytes (all tensors as `F32`), optionally with string
/// metadata (`__metadata__`).
pub fn encode_weights_with_metadata(weights: &Weights, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in weights {
        if name == "__metadata__" {
            bail!("a tensor may not be named __metadata__");
        }
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let start = data.len();
        data.reserve(v.len() * 4);
        for x in v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Encodes `weights` as safetensors bytes (see the module docs).
pub fn encode_weights(weights: &Weights) -> Result<Vec<u8>> {
    encode_weights_with_metadata(weights, &BTreeMap::new())
}

/// Decodes safetensors bytes into CPU tensors (candle's reader).
pub fn decode_weights(bytes: &[u8]) -> Result<Weights> {
    let m = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).context("decoding safetensors weights")?;
    Ok(m.into_iter().collect())
}

/// The `__metadata__` map of safetensors bytes (empty when absent).
pub fn decode_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    if bytes.len() < 8 {
        bail!("safetensors bytes too short ({} bytes)", bytes.len());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if bytes.len() < 8 + n {
        bail!("safetensors header of {n} bytes is truncated");
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).context("parsing the safetensors header")?;
    Ok(match v.get("__metadata__") {
        Some(m) => serde_json::from_value(m.clone())?,
        None => BTreeMap::new(),
    })
}
