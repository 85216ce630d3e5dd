//! Reader for the IDX format (MNIST, Fashion-MNIST, USPS, EMNIST, ...).
//!
//! An IDX file is a big-endian header — two zero bytes, an element-type byte, a
//! dimension-count byte, then one `u32` per dimension — followed by the elements in
//! row-major order. Files may be gzip-compressed; compression is detected by the gzip
//! magic bytes `1f 8b`, not by the file name.
//!
//! The reader never trusts the header: the element count is computed with overflow
//! checks and compared with the number of bytes actually present (for gzip input, bounded
//! by the maximal deflate expansion of the compressed length) *before* any allocation.

use std::io::Read;
use std::path::Path;

use super::{DataError, ImageDataset, Result};

/// Maximal expansion ratio of deflate (a little above the theoretical 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1040;

/// Element type of an IDX file, as encoded in the third header byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdxType {
    /// `0x08`: unsigned byte.
    U8,
    /// `0x09`: signed byte.
    I8,
    /// `0x0B`: big-endian i16.
    I16,
    /// `0x0C`: big-endian i32.
    I32,
    /// `0x0D`: big-endian f32.
    F32,
    /// `0x0E`: big-endian f64.
    F64,
}

impl IdxType {
    /// Decodes the type byte.
    pub fn from_code(code: u8) -> Option<IdxType> {
        Some(match code {
            0x08 => IdxType::U8,
            0x09 => IdxType::I8,
            0x0B => IdxType::I16,
            0x0C => IdxType::I32,
            0x0D => IdxType::F32,
            0x0E => IdxType::F64,
            _ => return None,
        })
    }

    /// The type byte.
    pub fn code(self) -> u8 {
        match self {
            IdxType::U8 => 0x08,
            IdxType::I8 => 0x09,
            IdxType::I16 => 0x0B,
            IdxType::I32 => 0x0C,
            IdxType::F32 => 0x0D,
            IdxType::F64 => 0x0E,
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            IdxType::U8 | IdxType::I8 => 1,
            IdxType::I16 => 2,
            IdxType::I32 | IdxType::F32 => 4,
            IdxType::F64 => 8,
        }
    }
}

/// The elements of an IDX array, in the file's element type.
#[derive(Clone, Debug, PartialEq)]
pub enum IdxData {
    /// Unsigned bytes.
    U8(Vec<u8>),
    /// Signed bytes.
    I8(Vec<i8>),
    /// 16-bit integers.
    I16(Vec<i16>),
    /// 32-bit integers.
    I32(Vec<i32>),
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
}

impl IdxData {
    /// Element type.
    pub fn idx_type(&self) -> IdxType {
        match self {
            IdxData::U8(_) => IdxType::U8,
            IdxData::I8(_) => IdxType::I8,
            IdxData::I16(_) => IdxType::I16,
            IdxData::I32(_) => IdxType::I32,
            IdxData::F32(_) => IdxType::F32,
            IdxData::F64(_) => IdxType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            IdxData::U8(v) => v.len(),
            IdxData::I8(v) => v.len(),
            IdxData::I16(v) => v.len(),
            IdxData::I32(v) => v.len(),
            IdxData::F32(v) => v.len(),
            IdxData::F64(v) => v.len(),
        }
    }

    /// `true` when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All elements converted to `f64` (exact for every IDX type).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            IdxData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            IdxData::I8(v) => v.iter().map(|&x| x as f64).collect(),
            IdxData::I16(v) => v.iter().map(|&x| x as f64).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            IdxData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            IdxData::F64(v) => v.clone(),
        }
    }
}

/// A decoded IDX file: its dimensions and its elements (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Elements; `data.len()` is the product of `dims`.
    pub data: IdxData,
}

impl IdxArray {
    /// Serialises the array into (uncompressed) IDX bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.dims.len() > 255 {
            return Err(DataError::InvalidArgument("IDX supports at most 255 dimensions".into()));
        }
        let mut out = vec![0, 0, self.data.idx_type().code(), self.dims.len() as u8];
        for &d in &self.dims {
            let d = u32::try_from(d).map_err(|_| DataError::InvalidArgument(format!("IDX dimension {d} does not fit in u32")))?;
            out.extend_from_slice(&d.to_be_bytes());
        }
        match &self.data {
            IdxData::U8(v) => out.extend_from_slice(v),
            IdxData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
            IdxData::I16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
            IdxData::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
            IdxData::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
            IdxData::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        }
        Ok(out)
    }
}

/// `true` when `bytes` start with the gzip magic `1f 8b`.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Parses IDX bytes (raw or gzip). `path` is only used in error messages.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    if is_gzip(bytes) {
        let bound = (bytes.len() as u64).saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024);
        let mut dec = flate2::read::GzDecoder::new(bytes);
        parse_idx_stream(&mut dec, bound, path, true)
    } else {
        let mut r = bytes;
        parse_idx_stream(&mut r, bytes.len() as u64, path, false)
    }
}

/// Reads and parses an IDX file (raw or gzip).
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_idx(&bytes, path)
}

fn read_exact_ctx(r: &mut dyn Read, buf: &mut [u8], path: &Path, what: &str, gz: bool) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            DataError::format(path, format!("truncated file: unexpected end of data while reading {what}"))
        } else if gz {
            DataError::format(path, format!("corrupt gzip stream while reading {what}: {e}"))
        } else {
            DataError::io(path, e)
        }
    })
}

/// Parses one IDX array from `r`; `bound` is an upper limit on the bytes `r` can produce,
/// used to reject absurd headers before allocating.
fn parse_idx_stream(r: &mut dyn Read, bound: u64, path: &Path, gz: bool) -> Result<IdxArray> {
    let mut head = [0u8; 4];
    read_exact_ctx(r, &mut head, path, "the IDX magic number", gz)?;
    if head[0] != 0 || head[1] != 0 {
        return Err(DataError::format(
            path,
            format!("not an IDX file: magic starts with {:02x} {:02x}, expected 00 00", head[0], head[1]),
        ));
    }
    let ty = IdxType::from_code(head[2]).ok_or_else(|| DataError::format(path, format!("unknown IDX element type 0x{:02x}", head[2])))?;
    let ndim = head[3] as usize;
    if ndim == 0 {
        return Err(DataError::format(path, "IDX header declares 0 dimensions"));
    }
    let header_len = 4 + 4 * ndim as u64;
    if header_len > bound {
        return Err(DataError::format(
            path,
            format!("truncated file: header needs {header_len} bytes for {ndim} dimensions"),
        ));
    }
    let mut dim_bytes = vec![0u8; 4 * ndim];
    read_exact_ctx(r, &mut dim_bytes, path, "the IDX dimensions", gz)?;
    let dims: Vec<usize> = dim_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::format(path, format!("IDX dimensions {dims:?}: element count overflows")))?;
    let nbytes = count
        .checked_mul(ty.size())
        .ok_or_else(|| DataError::format(path, format!("IDX dimensions {dims:?}: byte size overflows")))?;
    let available = bound - header_len;
    if nbytes as u64 > available {
        return Err(DataError::format(
            path,
            if gz {
                format!("IDX dimensions {dims:?} need {nbytes} bytes of {ty:?}, more than this gzip file can hold")
            } else {
                format!("truncated file: IDX dimensions {dims:?} need {nbytes} bytes of {ty:?} but only {available} follow the header")
            },
        ));
    }
    // Raw input: `nbytes` is bounded by the file length, allocate it at once. Gzip input:
    // the bound is loose, so grow the buffer only as decompressed data actually arrives.
    let initial = if gz { nbytes.min(1 << 22) } else { nbytes };
    let mut raw = Vec::with_capacity(initial);
    (&mut *r).take(nbytes as u64).read_to_end(&mut raw).map_err(|e| {
        if gz {
            DataError::format(path, format!("corrupt gzip stream while reading the IDX data: {e}"))
        } else {
            DataError::io(path, e)
        }
    })?;
    if raw.len() < nbytes {
        return Err(DataError::format(
            path,
            format!(
                "truncated file: IDX dimensions {dims:?} need {nbytes} data bytes but only {} are present",
                raw.len()
            ),
        ));
    }
    // Nothing may follow the data.
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(DataError::format(
                path,
                format!("trailing bytes after the {nbytes} data bytes declared by IDX dimensions {dims:?}"),
            ))
        }
        Err(e) => return Err(DataError::format(path, format!("corrupt data after the IDX array: {e}"))),
    }
    let data = match ty {
        IdxType::U8 => IdxData::U8(raw),
        IdxType::I8 => IdxData::I8(raw.iter().map(|&b| b as i8).collect()),
        IdxType::I16 => IdxData::I16(raw.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()),
        IdxType::I32 => IdxData::I32(raw.chunks_exact(4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()),
        IdxType::F32 => IdxData::F32(raw.chunks_exact(4).map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()),
        IdxType::F64 => IdxData::F64(
            raw.chunks_exact(8)
                .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    };
    Ok(IdxArray { dims, data })
}

/// Converts an IDX image array into `(channels, height, width, bytes)`.
///
/// Accepts `[n, h, w]` (grey) or `[n, c, h, w]` arrays of `u8`.
fn images_from_idx(arr: IdxArray, path: &Path) -> Result<(usize, usize, usize, usize, Vec<u8>)> {
    let (n, c, h, w) = match arr.dims[..] {
        [n, h, w] => (n, 1, h, w),
        [n, c, h, w] => (n, c, h, w),
        _ => {
            return Err(DataError::format(
                path,
                format!("expected image dimensions [n, h, w] or [n, c, h, w], found {:?}", arr.dims),
            ))
        }
    };
    match arr.data {
        IdxData::U8(v) => Ok((n, c, h, w, v)),
        other => Err(DataError::format(
            path,
            format!("expected u8 image pixels, found {:?}", other.idx_type()),
        )),
    }
}

/// Converts an IDX label array (`[n]` of any integer type) into `u32` labels.
fn labels_from_idx(arr: IdxArray, path: &Path) -> Result<Vec<u32>> {
    if arr.dims.len() != 1 {
        return Err(DataError::format(
            path,
            format!("expected label dimensions [n], found {:?}", arr.dims),
        ));
    }
    let as_i64: Vec<i64> = match arr.data {
        IdxData::U8(v) => return Ok(v.into_iter().map(u32::from).collect()),
        IdxData::I8(v) => v.into_iter().map(i64::from).collect(),
        IdxData::I16(v) => v.into_iter().map(i64::from).collect(),
        IdxData::I32(v) => v.into_iter().map(i64::from).collect(),
        other => {
            return Err(DataError::format(
                path,
                format!("expected integer labels, found {:?}", other.idx_type()),
            ))
        }
    };
    as_i64
        .into_iter()
        .enumerate()
        .map(|(i, l)| u32::try_from(l).map_err(|_| DataError::format(path, format!("label {l} of sample {i} is negative"))))
        .collect()
}

/// Loads an image IDX file and a label IDX file into an [`ImageDataset`].
///
/// `num_classes` is inferred as `max(label) + 1`; use [`load_idx_images_labels_with`] to
/// enforce a known class count.
pub fn load_idx_images_labels(images_path: impl AsRef<Path>, labels_path: impl AsRef<Path>) -> Result<ImageDataset> {
    load_idx_images_labels_with(images_path, labels_path, None, "idx")
}

/// Loads an image IDX file and a label IDX file, checking that every label is smaller
/// than `num_classes` when it is given. `name` names the dataset in messages.
pub fn load_idx_images_labels_with(
    images_path: impl AsRef<Path>,
    labels_path: impl AsRef<Path>,
    num_classes: Option<usize>,
    name: &str,
) -> Result<ImageDataset> {
    let (ip, lp) = (images_path.as_ref(), labels_path.as_ref());
    let (n, c, h, w, images) = images_from_idx(read_idx(ip)?, ip)?;
    let labels = labels_from_idx(read_idx(lp)?, lp)?;
    if labels.len() != n {
        return Err(DataError::format(
            lp,
            format!("{} labels but {} has {n} images", labels.len(), ip.display()),
        ));
    }
    let inferred = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let num_classes = match num_classes {
        Some(k) => {
            if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
                return Err(DataError::format(
                    lp,
                    format!("label {l} of sample {i} is out of range for {k} classes"),
                ));
            }
            k
        }
        None => inferred,
    };
    Ok(ImageDataset {
        name: name.to_string(),
        channels: c,
        height: h,
        width: w,
        num_classes,
        images,
        labels,
        class_names: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{gzip, TempDir};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn p() -> &'static Path {
        Path::new("mem.idx")
    }

    #[test]
    fn roundtrip_all_types_raw_and_gzip() {
        let arrays = vec![
            IdxArray {
                dims: vec![2, 3],
                data: IdxData::U8(vec![0, 1, 2, 253, 254, 255]),
            },
            IdxArray {
                dims: vec![3],
                data: IdxData::I8(vec![-128, 0, 127]),
            },
            IdxArray {
                dims: vec![2, 1, 2],
                data: IdxData::I16(vec![-32768, -1, 1, 32767]),
            },
            IdxArray {
                dims: vec![2],
                data: IdxData::I32(vec![i32::MIN, 123_456_789]),
            },
            IdxArray {
                dims: vec![2],
                data: IdxData::F32(vec![-1.5, 3.25e10]),
            },
            IdxArray {
                dims: vec![1, 2],
                data: IdxData::F64(vec![std::f64::consts::PI, -0.0]),
            },
            IdxArray {
                dims: vec![0, 5],
                data: IdxData::U8(vec![]),
            },
        ];
        for a in arrays {
            let raw = a.to_bytes().unwrap();
            assert_eq!(parse_idx(&raw, p()).unwrap(), a);
            let gz = gzip(&raw);
            assert!(is_gzip(&gz));
            assert_eq!(parse_idx(&gz, p()).unwrap(), a);
        }
    }

    #[test]
    fn header_is_big_endian() {
        let bytes = [0u8, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xff, 0xfe];
        let a = parse_idx(&bytes, p()).unwrap();
        assert_eq!(a.dims, vec![2]);
        assert_eq!(a.data, IdxData::I16(vec![0x0102, -2]));
    }

    #[test]
    fn errors_name_file_and_problem() {
        let path = Path::new("/some/where/train-images.idx");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 0, 8, 1, 0, 0, 0, 1, 7], "not an IDX file"),
            (vec![0, 0, 0x42, 1, 0, 0, 0, 1, 7], "unknown IDX element type"),
            (vec![0, 0, 8, 1, 0, 0, 0, 3, 7], "truncated"),
            (vec![0, 0, 8, 2, 0, 0], "truncated"),
            (vec![0, 0, 8, 1, 0, 0, 0, 1, 7, 9], "trailing bytes"),
            (vec![0, 0, 8, 0], "0 dimensions"),
            (
                {
                    let mut v = vec![0, 0, 0x0E, 4];
                    for _ in 0..4 {
                        v.extend_from_slice(&u32::MAX.to_be_bytes());
                    }
                    v
                },
                "overflows",
            ),
            (vec![], "truncated"),
        ];
        for (bytes, what) in cases {
            let e = parse_idx(&bytes, path).unwrap_err().to_string();
            assert!(e.contains("/some/where/train-images.idx"), "{e}");
            assert!(e.contains(what), "expected `{what}` in `{e}`");
        }
        // Corrupt gzip stream.
        let mut gz = gzip(&[0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]);
        let n = gz.len();
        gz.truncate(n - 6);
        let e = parse_idx(&gz, path).unwrap_err().to_string();
        assert!(e.contains("train-images.idx"), "{e}");
        // Huge declared size in a tiny gzip file is rejected before allocation.
        let gz = gzip(&[0, 0, 8, 2, 0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]);
        let e = parse_idx(&gz, path).unwrap_err().to_string();
        assert!(e.contains("more than this gzip file can hold"), "{e}");
    }

    fn write_mnist_like(dir: &Path, n: usize, labels: &[u8], gz: bool) -> (std::path::PathBuf, std::path::PathBuf) {
        let imgs = IdxArray {
            dims: vec![n, 4, 3],
            data: IdxData::U8((0..n * 12).map(|i| (i % 251) as u8).collect()),
        };
        let labs = IdxArray {
            dims: vec![labels.len()],
            data: IdxData::U8(labels.to_vec()),
        };
        let (mut ib, mut lb) = (imgs.to_bytes().unwrap(), labs.to_bytes().unwrap());
        if gz {
            ib = gzip(&ib);
            lb = gzip(&lb);
        }
        let ip = dir.join(if gz { "img.gz" } else { "img" });
        let lp = dir.join(if gz { "lab.gz" } else { "lab" });
        std::fs::write(&ip, ib).unwrap();
        std::fs::write(&lp, lb).unwrap();
        (ip, lp)
    }

    #[test]
    fn load_images_labels_from_files() {
        let dir = TempDir::new("idx_files");
        for gz in [false, true] {
            let (ip, lp) = write_mnist_like(dir.path(), 5, &[3, 0, 1, 3, 2], gz);
            let ds = load_idx_images_labels(&ip, &lp).unwrap();
            assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (5, 1, 4, 3));
            assert_eq!(ds.num_classes, 4);
            assert_eq!(ds.class_counts(), vec![1, 1, 1, 2]);
            assert_eq!(ds.image(1), &(12..24).map(|i| i as u8).collect::<Vec<_>>()[..]);
            let e = load_idx_images_labels_with(&ip, &lp, Some(3), "t").unwrap_err().to_string();
            assert!(e.contains("label 3") && e.contains(&lp.display().to_string()), "{e}");
        }
        let (ip, lp) = write_mnist_like(dir.path(), 5, &[0, 1, 2], false);
        let e = load_idx_images_labels(&ip, &lp).unwrap_err().to_string();
        assert!(e.contains("3 labels") && e.contains("5 images"), "{e}");
        let e = load_idx_images_labels(dir.path().join("missing"), &lp).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    /// Feeds thousands of corrupted inputs to the parser: it must return, never panic.
    #[test]
    fn fuzz_corrupted_inputs_never_panic() {
        let valid = IdxArray {
            dims: vec![6, 5, 4],
            data: IdxData::U8((0..120).map(|i| i as u8).collect()),
        }
        .to_bytes()
        .unwrap();
        let valid_gz = gzip(&valid);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut oks = 0;
        for case in 0..3000 {
            let base = if case % 2 == 0 { &valid } else { &valid_gz };
            let mut b = base.clone();
            match case % 5 {
                0 => {
                    let n = rng.gen_range(0..64);
                    b = (0..n).map(|_| rng.gen()).collect();
                    if rng.gen_bool(0.5) && b.len() >= 4 {
                        b[0] = 0;
                        b[1] = 0;
                        b[2] = [8u8, 9, 0x0B, 0x0C, 0x0D, 0x0E][rng.gen_range(0..6)];
                        b[3] = rng.gen_range(0..6);
                    }
                }
                1 => b.truncate(rng.gen_range(0..b.len())),
                2 => {
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..b.len());
                        b[i] ^= 1 << rng.gen_range(0..8);
                    }
                }
                3 => {
                    // Mutate header fields of the raw file, then maybe compress.
                    b = valid.clone();
                    let i = rng.gen_range(0..16);
                    b[i] = rng.gen();
                    if rng.gen_bool(0.5) {
                        b = gzip(&b);
                    }
                }
                _ => {
                    b.extend((0..rng.gen_range(1..8)).map(|_| rng.gen::<u8>()));
                }
            }
            if let Ok(a) = parse_idx(&b, p()) {
                assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
                oks += 1;
            }
        }
        assert!(oks > 0, "some mutations (e.g. flips in pixel bytes) must still parse");
    }
}
