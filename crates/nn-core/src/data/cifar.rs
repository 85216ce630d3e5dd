//! CIFAR-10 and CIFAR-100 readers for the official binary layout.
//!
//! * CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` (train),
//!   `test_batch.bin` (test), `batches.meta.txt` (class names, one a line). A record is
//!   1 label byte followed by 3072 pixel bytes: the 1024 R values, then G, then B, each
//!   plane row-major 32x32 — which is already CHW.
//! * CIFAR-100 (`cifar-100-binary/`): `train.bin`, `test.bin`, `fine_label_names.txt`,
//!   `coarse_label_names.txt`. A record is 1 coarse label byte (< 20), 1 fine label byte
//!   (< 100), then 3072 pixel bytes as above.

use std::path::{Path, PathBuf};

use super::{DataError, ImageDataset, Result};

/// Side of a CIFAR image.
pub const CIFAR_SIDE: usize = 32;
/// Pixel bytes of one CIFAR image (3 x 32 x 32).
pub const CIFAR_IMAGE_BYTES: usize = 3 * CIFAR_SIDE * CIFAR_SIDE;
/// File names of the CIFAR-10 training batches.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// File name of the CIFAR-10 test batch.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
/// File name of the CIFAR-100 training set.
pub const CIFAR100_TRAIN_FILE: &str = "train.bin";
/// File name of the CIFAR-100 test set.
pub const CIFAR100_TEST_FILE: &str = "test.bin";

/// Which CIFAR-100 label to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cifar100Labels {
    /// The 100 fine classes.
    #[default]
    Fine,
    /// The 20 coarse superclasses.
    Coarse,
}

/// Parses records of `bounds.len()` label bytes + 3072 pixel bytes; label byte `k` must be
/// `< bounds[k]`. `label_pos` picks which label byte to keep. Appends to `images` / `labels`.
fn parse_records(bytes: &[u8], path: &Path, bounds: &[usize], label_pos: usize, images: &mut Vec<u8>, labels: &mut Vec<u32>) -> Result<()> {
    let label_bytes = bounds.len();
    let rec = label_bytes + CIFAR_IMAGE_BYTES;
    if bytes.is_empty() {
        return Err(DataError::format(path, "empty file: no CIFAR record"));
    }
    #[allow(clippy::manual_is_multiple_of)] // keeps the crate's MSRV (1.80)
    let whole = bytes.len() % rec == 0;
    if !whole {
        return Err(DataError::format(
            path,
            format!(
                "file size {} is not a multiple of the {rec}-byte CIFAR record ({} whole records + {} stray bytes; truncated or not a CIFAR binary file?)",
                bytes.len(),
                bytes.len() / rec,
                bytes.len() % rec
            ),
        ));
    }
    let n = bytes.len() / rec;
    // Validate all labels before growing the buffers.
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        for (k, &l) in r[..label_bytes].iter().enumerate() {
            let bound = bounds[k];
            if l as usize >= bound {
                return Err(DataError::format(
                    path,
                    format!(
                        "record {i} (byte offset {}): label byte {k} = {l} is out of range (< {bound} expected)",
                        i * rec + k
                    ),
                ));
            }
        }
    }
    images.reserve(n * CIFAR_IMAGE_BYTES);
    labels.reserve(n);
    for r in bytes.chunks_exact(rec) {
        labels.push(r[label_pos] as u32);
        images.extend_from_slice(&r[label_bytes..]);
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Reads optional class names (one per non-empty line); `None` if the file is absent.
fn read_names(path: &Path, expected: usize) -> Result<Option<Vec<String>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if names.len() != expected {
        return Err(DataError::format(path, format!("{} class names, expected {expected}", names.len())));
    }
    Ok(Some(names))
}

/// Parses CIFAR-10 batch bytes (`path` is used in messages) into `(images, labels)`.
pub fn parse_cifar10(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, Vec<u32>)> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    parse_records(bytes, path, &[10], 0, &mut images, &mut labels)?;
    Ok((images, labels))
}

/// Parses CIFAR-100 bytes into `(images, labels)` with the chosen label kind. Both label
/// bytes are range-checked (coarse < 20, fine < 100).
pub fn parse_cifar100(bytes: &[u8], path: &Path, kind: Cifar100Labels) -> Result<(Vec<u8>, Vec<u32>)> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let pos = match kind {
        Cifar100Labels::Coarse => 0,
        Cifar100Labels::Fine => 1,
    };
    parse_records(bytes, path, &[20, 100], pos, &mut images, &mut labels)?;
    Ok((images, labels))
}

/// Reads CIFAR-10 batch files (in the given order) into one dataset. Class names come
/// from `batches.meta.txt` next to the first file, when present.
pub fn read_cifar10_files(paths: &[PathBuf], name: &str) -> Result<ImageDataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for p in paths {
        let bytes = read_file(p)?;
        parse_records(&bytes, p, &[10], 0, &mut images, &mut labels)?;
    }
    let class_names = match paths.first().and_then(|p| p.parent()) {
        Some(dir) => read_names(&dir.join("batches.meta.txt"), 10)?.unwrap_or_default(),
        None => Vec::new(),
    };
    ImageDataset::new(name, 3, CIFAR_SIDE, CIFAR_SIDE, 10, images, labels, class_names)
}

/// Loads the CIFAR-10 training (`train = true`: the five data batches) or test split from
/// the `cifar-10-batches-bin` directory `dir`.
pub fn load_cifar10(dir: impl AsRef<Path>, train: bool) -> Result<ImageDataset> {
    let dir = dir.as_ref();
    let (files, name): (Vec<PathBuf>, _) = if train {
        (CIFAR10_TRAIN_FILES.iter().map(|f| dir.join(f)).collect(), "cifar10/train")
    } else {
        (vec![dir.join(CIFAR10_TEST_FILE)], "cifar10/test")
    };
    read_cifar10_files(&files, name)
}

/// Reads one CIFAR-100 binary file (`train.bin` or `test.bin`). Class names come from
/// `fine_label_names.txt` / `coarse_label_names.txt` next to it, when present.
pub fn read_cifar100_file(path: impl AsRef<Path>, kind: Cifar100Labels, name: &str) -> Result<ImageDataset> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let (images, labels) = parse_cifar100(&bytes, path, kind)?;
    let (names_file, k) = match kind {
        Cifar100Labels::Fine => ("fine_label_names.txt", 100),
        Cifar100Labels::Coarse => ("coarse_label_names.txt", 20),
    };
    let class_names = match path.parent() {
        Some(dir) => read_names(&dir.join(names_file), k)?.unwrap_or_default(),
        None => Vec::new(),
    };
    ImageDataset::new(name, 3, CIFAR_SIDE, CIFAR_SIDE, k, images, labels, class_names)
}

/// Loads the CIFAR-100 training or test split from the `cifar-100-binary` directory `dir`.
pub fn load_cifar100(dir: impl AsRef<Path>, train: bool, kind: Cifar100Labels) -> Result<ImageDataset> {
    let dir = dir.as_ref();
    let (file, name) = if train {
        (CIFAR100_TRAIN_FILE, "cifar100/train")
    } else {
        (CIFAR100_TEST_FILE, "cifar100/test")
    };
    read_cifar100_file(dir.join(file), kind, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Deterministic pixel pattern of record `i`: R plane, G plane, B plane.
    fn pixels(i: usize) -> Vec<u8> {
        (0..CIFAR_IMAGE_BYTES).map(|p| ((p / 1024) * 80 + i * 7 + p % 13) as u8).collect()
    }

    fn cifar10_bytes(labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            v.push(l);
            v.extend(pixels(i));
        }
        v
    }

    fn cifar100_bytes(labels: &[(u8, u8)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, &(c, f)) in labels.iter().enumerate() {
            v.push(c);
            v.push(f);
            v.extend(pixels(i));
        }
        v
    }

    #[test]
    fn cifar10_official_layout() {
        let dir = TempDir::new("cifar10");
        let d = dir.path();
        for (b, f) in CIFAR10_TRAIN_FILES.iter().enumerate() {
            std::fs::write(d.join(f), cifar10_bytes(&[b as u8, 9, (b + 3) as u8])).unwrap();
        }
        std::fs::write(d.join(CIFAR10_TEST_FILE), cifar10_bytes(&[4, 2])).unwrap();
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
        std::fs::write(d.join("batches.meta.txt"), names).unwrap();
        let train = load_cifar10(d, true).unwrap();
        assert_eq!(train.len(), 15);
        assert_eq!((train.channels, train.height, train.width, train.num_classes), (3, 32, 32, 10));
        assert_eq!(train.labels, vec![0, 9, 3, 1, 9, 4, 2, 9, 5, 3, 9, 6, 4, 9, 7]);
        assert_eq!(train.class_names[9], "truck");
        // CHW: record 1 of batch 1 keeps its R, G, B planes in order.
        assert_eq!(train.image(1), &pixels(1)[..]);
        assert_eq!(train.image(1)[1024], 80 + 7 + (1024 % 13) as u8);
        let test = load_cifar10(d, false).unwrap();
        assert_eq!(test.labels, vec![4, 2]);
        assert_eq!(test.image(0), &pixels(0)[..]);

        std::fs::write(d.join(CIFAR10_TEST_FILE), cifar10_bytes(&[4, 10])).unwrap();
        let e = load_cifar10(d, false).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("record 1") && e.contains("10"), "{e}");
        let mut b = cifar10_bytes(&[1, 2]);
        b.pop();
        std::fs::write(d.join(CIFAR10_TEST_FILE), b).unwrap();
        let e = load_cifar10(d, false).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("not a multiple"), "{e}");
        std::fs::remove_file(d.join("data_batch_3.bin")).unwrap();
        let e = load_cifar10(d, true).unwrap_err().to_string();
        assert!(e.contains("data_batch_3.bin"), "{e}");
    }

    #[test]
    fn cifar100_official_layout() {
        let dir = TempDir::new("cifar100");
        let d = dir.path();
        std::fs::write(d.join("train.bin"), cifar100_bytes(&[(19, 99), (0, 5), (7, 42)])).unwrap();
        std::fs::write(d.join("test.bin"), cifar100_bytes(&[(3, 30)])).unwrap();
        let coarse: String = (0..20).map(|i| format!("super{i}\n")).collect();
        std::fs::write(d.join("coarse_label_names.txt"), coarse).unwrap();
        let fine = load_cifar100(d, true, Cifar100Labels::Fine).unwrap();
        assert_eq!(fine.labels, vec![99, 5, 42]);
        assert_eq!(fine.num_classes, 100);
        assert!(fine.class_names.is_empty());
        assert_eq!(fine.image(2), &pixels(2)[..]);
        let coarse = load_cifar100(d, true, Cifar100Labels::Coarse).unwrap();
        assert_eq!(coarse.labels, vec![19, 0, 7]);
        assert_eq!(coarse.num_classes, 20);
        assert_eq!(coarse.class_names[19], "super19");
        let test = load_cifar100(d, false, Cifar100Labels::Fine).unwrap();
        assert_eq!(test.labels, vec![30]);
        // Out-of-range coarse label is caught even when fine labels are requested.
        std::fs::write(d.join("test.bin"), cifar100_bytes(&[(20, 30)])).unwrap();
        let e = load_cifar100(d, false, Cifar100Labels::Fine).unwrap_err().to_string();
        assert!(e.contains("test.bin") && e.contains("20"), "{e}");
        std::fs::write(d.join("test.bin"), cifar100_bytes(&[(2, 100)])).unwrap();
        let e = load_cifar100(d, false, Cifar100Labels::Fine).unwrap_err().to_string();
        assert!(e.contains("test.bin") && e.contains("100"), "{e}");
    }

    /// Thousands of corrupted inputs: the parsers return Ok or Err and never panic.
    #[test]
    fn fuzz_corrupted_inputs_never_panic() {
        let v10 = cifar10_bytes(&[1, 2, 3]);
        let v100 = cifar100_bytes(&[(1, 2), (3, 4)]);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let p = Path::new("fuzz.bin");
        for case in 0..2000 {
            let base = if case % 2 == 0 { &v10 } else { &v100 };
            let mut b = base.clone();
            match case % 4 {
                0 => b = (0..rng.gen_range(0..8000)).map(|_| rng.gen()).collect(),
                1 => b.truncate(rng.gen_range(0..b.len())),
                2 => {
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= 1 << rng.gen_range(0..8);
                    b[0] = rng.gen();
                }
                _ => b.extend((0..rng.gen_range(1..3100)).map(|_| rng.gen::<u8>())),
            }
            if let Ok((imgs, labs)) = parse_cifar10(&b, p) {
                assert_eq!(imgs.len(), labs.len() * CIFAR_IMAGE_BYTES);
                assert!(labs.iter().all(|&l| l < 10));
            }
            for kind in [Cifar100Labels::Fine, Cifar100Labels::Coarse] {
                if let Ok((imgs, labs)) = parse_cifar100(&b, p, kind) {
                    assert_eq!(imgs.len(), labs.len() * CIFAR_IMAGE_BYTES);
                }
            }
        }
    }
}
