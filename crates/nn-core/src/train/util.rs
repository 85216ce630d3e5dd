//! File helpers of the training engine: atomic writes, safetensors with metadata, timestamps.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// flushed to disk (fsync), then renamed over `path`; the directory is synced best-effort.
/// A crash leaves either the old file or the new one, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        std::fs::remove_file(&tmp).ok();
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

fn to_st(t: &Tensor) -> Result<(Dtype, Vec<u8>)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (Dtype::F32, t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F64 => (Dtype::F64, t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::U32 => (Dtype::U32, t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::I64 => (Dtype::I64, t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::U8 => (Dtype::U8, t.to_vec1::<u8>()?),
        DType::F16 => (Dtype::F16, t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => (
            Dtype::BF16,
            t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        d => bail!("cannot store a tensor of dtype {d:?} in a checkpoint"),
    })
}

fn from_st(dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<Tensor> {
    let dev = &Device::Cpu;
    fn chunks<const N: usize>(d: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        d.chunks_exact(N).map(|c| c.try_into().expect("exact chunk"))
    }
    Ok(match dtype {
        Dtype::F32 => Tensor::from_vec(chunks::<4>(data).map(f32::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        Dtype::F64 => Tensor::from_vec(chunks::<8>(data).map(f64::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        Dtype::U32 => Tensor::from_vec(chunks::<4>(data).map(u32::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        Dtype::I64 => Tensor::from_vec(chunks::<8>(data).map(i64::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        Dtype::U8 => Tensor::from_vec(data.to_vec(), shape, dev)?,
        Dtype::F16 => Tensor::from_vec(chunks::<2>(data).map(half::f16::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        Dtype::BF16 => Tensor::from_vec(chunks::<2>(data).map(half::bf16::from_le_bytes).collect::<Vec<_>>(), shape, dev)?,
        d => bail!("unsupported tensor dtype {d:?}"),
    })
}

/// SHA-256 over the tensors in name order (name, dtype, shape and bytes of each), hex encoded.
fn digest<'a>(items: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, dtype, shape, data) in items {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}{shape:?}").as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Key of the checksum entry in the safetensors metadata.
pub(crate) const CHECKSUM_KEY: &str = "sha256";

/// Serialises `tensors` and string `metadata` (plus a checksum entry) as safetensors bytes.
pub(crate) fn safetensors_bytes(tensors: &HashMap<String, Tensor>, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut owned: BTreeMap<&str, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (k, t) in tensors {
        let (d, bytes) = to_st(t).with_context(|| format!("serialising tensor `{k}`"))?;
        owned.insert(k.as_str(), (d, t.dims().to_vec(), bytes));
    }
    let mut meta = metadata.clone();
    meta.insert(
        CHECKSUM_KEY.into(),
        digest(owned.iter().map(|(k, (d, s, b))| (*k, *d, s.as_slice(), b.as_slice()))),
    );
    let views = owned
        .iter()
        .map(|(k, (d, s, b))| Ok((k.to_string(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::tensor::serialize(views, &Some(meta))?)
}

/// Reads a file written by [`safetensors_bytes`], verifying its checksum (when present).
/// Every error names the file.
pub(crate) fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&buf).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupted?): {e:?}",
            path.display()
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&buf).map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut items: Vec<(String, TensorView)> = st.tensors();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(want) = meta.get(CHECKSUM_KEY) {
        let got = digest(items.iter().map(|(k, v)| (k.as_str(), v.dtype(), v.shape(), v.data())));
        if &got != want {
            bail!("{} is corrupted: checksum mismatch (stored {want}, computed {got})", path.display());
        }
    }
    let mut out = HashMap::new();
    for (k, v) in items {
        let t = from_st(v.dtype(), v.shape(), v.data()).with_context(|| format!("{}: tensor `{k}`", path.display()))?;
        out.insert(k, t);
    }
    Ok((out, meta))
}

/// The current UTC time as RFC 3339 (`2024-05-01T12:34:56Z`).
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (proleptic Gregorian), days since 1970-01-01
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_roundtrip_checksum_and_truncation() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("nncore-train-util-{}", std::process::id()));
        let path = dir.join("x.safetensors");
        let mut t = HashMap::new();
        t.insert("a".to_string(), Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?);
        t.insert("b.step".to_string(), Tensor::new(&[7.0f64], &Device::Cpu)?);
        t.insert("c".to_string(), Tensor::new(&[3u32, 4], &Device::Cpu)?);
        let meta: HashMap<String, String> = [("k".to_string(), "{\"x\":1}".to_string())].into();
        let bytes = safetensors_bytes(&t, &meta)?;
        write_atomic(&path, &bytes)?;
        let (back, m) = read_safetensors(&path)?;
        assert_eq!(m["k"], "{\"x\":1}");
        assert_eq!(back["a"].to_vec2::<f32>()?, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(back["b.step"].to_vec1::<f64>()?, vec![7.0]);
        assert_eq!(back["c"].to_vec1::<u32>()?, vec![3, 4]);
        // truncated
        write_atomic(&path, &bytes[..bytes.len() - 3])?;
        let e = read_safetensors(&path).unwrap_err().to_string();
        assert!(e.contains("x.safetensors"), "{e}");
        // a flipped bit in the data
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        write_atomic(&path, &bad)?;
        let e = read_safetensors(&path).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("x.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20"), "{ts}");
        Ok(())
    }
}
