//! Named datasets: where to find them, how to load them, and whether the files are intact.
//!
//! Known datasets: `mnist`, `fashion-mnist`, `usps`, `cifar10`, `cifar100`, `imagenet`.
//! Each is searched, in order, in the data roots returned by [`search_roots`]:
//!
//! 1. the explicit directory (`--data DIR`), if any;
//! 2. the directories in the `COMPACT_VISION_DATA` environment variable (path-list syntax);
//! 3. `<workspace>/datasets`;
//! 4. `<workspace>/../shared/datasets`;
//! 5. `/usr/share/datasets`.
//!
//! Inside a root, each dataset has a few conventional sub-directories (e.g.
//! `cifar10/cifar-10-batches-bin` or `cifar-10-batches-bin`). A manifest lists the files of
//! each dataset with their sha256 where known; [`report`] checks them all.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cifar::{self, Cifar100Labels};
use super::idx::load_idx_images_labels_with;
use super::image_folder::{ImageFolderDataset, ImageFolderOptions};
use super::{DataError, Dataset, ImageDataset, Result};

/// Environment variable naming extra data roots.
pub const DATA_ENV: &str = "COMPACT_VISION_DATA";

/// A dataset split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training set.
    Train,
    /// Test set (the validation set for ImageNet).
    Test,
}

impl Split {
    /// `"train"` or `"test"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Split {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Split> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "test" | "val" | "valid" | "validation" | "t10k" => Ok(Split::Test),
            other => Err(DataError::InvalidArgument(format!("unknown split `{other}` (train or test)"))),
        }
    }
}

/// A file (or directory) belonging to a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownFile {
    /// Path relative to the dataset directory.
    pub rel: &'static str,
    /// Expected sha256 (lower-case hex), when known.
    pub sha256: Option<&'static str>,
    /// Split that needs it; `None` for optional metadata.
    pub split: Option<Split>,
}

/// Static description of a named dataset.
#[derive(Clone, Copy, Debug)]
pub struct DatasetInfo {
    /// Canonical name.
    pub name: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// Candidate dataset directories relative to a data root, in search order.
    pub subdirs: &'static [&'static str],
    /// Files of the dataset.
    pub files: &'static [KnownFile],
    /// Number of classes.
    pub num_classes: usize,
    /// `(C, H, W)` of the stored images, when fixed.
    pub shape: Option<(usize, usize, usize)>,
    /// Usual normalisation mean.
    pub mean: &'static [f32],
    /// Usual normalisation standard deviation.
    pub std: &'static [f32],
    /// How to obtain the data.
    pub how_to_get: &'static str,
}

const fn f(rel: &'static str, sha256: &'static str, split: Split) -> KnownFile {
    KnownFile {
        rel,
        sha256: Some(sha256),
        split: Some(split),
    }
}

const fn u(rel: &'static str, split: Option<Split>) -> KnownFile {
    KnownFile { rel, sha256: None, split }
}

use super::transforms as t;
use Split::{Test, Train};

const DATASETS: &[DatasetInfo] = &[
    DatasetInfo {
        name: "mnist",
        aliases: &[],
        subdirs: &["mnist", "MNIST"],
        files: &[
            f("train-images-idx3-ubyte.gz", "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19", Train),
            f("train-labels-idx1-ubyte.gz", "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a", Train),
            f("t10k-images-idx3-ubyte.gz", "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209", Test),
            f("t10k-labels-idx1-ubyte.gz", "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920", Test),
        ],
        num_classes: 10,
        shape: Some((1, 28, 28)),
        mean: &t::MNIST_MEAN,
        std: &t::MNIST_STD,
        how_to_get: "MNIST ships with the project in `datasets/mnist/` (also in ../shared/datasets/mnist); restore it with `git checkout -- datasets/mnist` or pass --data DIR with a `mnist/` folder of the four gzip IDX files.",
    },
    DatasetInfo {
        name: "fashion-mnist",
        aliases: &["fashion_mnist", "fashionmnist", "fmnist"],
        subdirs: &["fashion-mnist", "fashion_mnist", "FashionMNIST"],
        files: &[
            f("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", Train),
            f("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", Train),
            f("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", Test),
            f("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", Test),
        ],
        num_classes: 10,
        shape: Some((1, 28, 28)),
        mean: &t::FASHION_MNIST_MEAN,
        std: &t::FASHION_MNIST_STD,
        how_to_get: "Install the Debian package: `apt-get update && apt-get install -y dataset-fashion-mnist` (puts it in /usr/share/datasets/fashion-mnist/).",
    },
    DatasetInfo {
        name: "usps",
        aliases: &[],
        subdirs: &["usps", "USPS"],
        files: &[
            f("train-images-idx3-ubyte.gz", "16e00f30d3806aff79a28f79c59fb61d3b0d53a3d5719c3a77ea9ebb4aa14fc6", Train),
            f("train-labels-idx1-ubyte.gz", "15641a88cc322c19f1cc0485ebfb675f4be95b8abe638df266b1dd7114446998", Train),
            f("t10k-images-idx3-ubyte.gz", "67c92f462fae74a274f8a1a8a0cbc14257e07fb257c89aea9d834935f6e97e94", Test),
            f("t10k-labels-idx1-ubyte.gz", "7c1be1a9b1d7f63257d6ae6de0f5c6cc47f0cc5672925f6c86aca6c1829d48bd", Test),
        ],
        num_classes: 10,
        shape: Some((1, 16, 16)),
        mean: &t::USPS_MEAN,
        std: &t::USPS_STD,
        how_to_get: "USPS is provided in ../shared/datasets/usps (beside the workspace); it must not be committed. Point --data or COMPACT_VISION_DATA at a folder holding `usps/`.",
    },
    DatasetInfo {
        name: "cifar10",
        aliases: &["cifar-10", "cifar_10"],
        subdirs: &["cifar10/cifar-10-batches-bin", "cifar-10-batches-bin", "cifar10"],
        files: &[
            f("data_batch_1.bin", "f2864180fce86ab4106016a49ea527cd9376db11e43effbeb9f2b263de915c0a", Train),
            f("data_batch_2.bin", "c52397bf76420e25e54c7ae21dfb41892d86a23f4d1ee338e7196744af969132", Train),
            f("data_batch_3.bin", "967b17f8138b600d580cdddcfb372d8f73098ceec84dd859ec0017a8b1e5db40", Train),
            f("data_batch_4.bin", "e41eba099e58636ef2a10ce7a6501246fe24e336c6f87f1639c78e53b60d0a53", Train),
            f("data_batch_5.bin", "71ee043011581dc7093922d11849252e4484e033d8dab4e63563992169a5eb83", Train),
            f("test_batch.bin", "cf28711b3059b27ed8a78d6529b5ba5b5c94130096ca62a1a924268a9a9ec05b", Test),
            KnownFile {
                rel: "batches.meta.txt",
                sha256: Some("558e74b5e208382e186da55784b4bac2cd52e558448e1b5800990fdb28ed8033"),
                split: None,
            },
        ],
        num_classes: 10,
        shape: Some((3, 32, 32)),
        mean: &t::CIFAR10_MEAN,
        std: &t::CIFAR10_STD,
        how_to_get: "CIFAR-10 (binary version) is provided in ../shared/datasets/cifar10/cifar-10-batches-bin; it must not be committed. Otherwise unpack the official cifar-10-binary.tar.gz into a data root.",
    },
    DatasetInfo {
        name: "cifar100",
        aliases: &["cifar-100", "cifar_100"],
        subdirs: &["cifar100/cifar-100-binary", "cifar-100-binary", "cifar100"],
        files: &[
            u("train.bin", Some(Train)),
            u("test.bin", Some(Test)),
            u("fine_label_names.txt", None),
            u("coarse_label_names.txt", None),
        ],
        num_classes: 100,
        shape: Some((3, 32, 32)),
        mean: &t::CIFAR100_MEAN,
        std: &t::CIFAR100_STD,
        how_to_get: "CIFAR-100 is not installed on these machines: unpack the official cifar-100-binary.tar.gz into a data root (giving `cifar-100-binary/{train,test}.bin`) and pass --data or set COMPACT_VISION_DATA.",
    },
    DatasetInfo {
        name: "imagenet",
        aliases: &["ilsvrc2012", "imagenet1k"],
        subdirs: &["imagenet", "ILSVRC2012", "imagenet1k"],
        files: &[u("train", Some(Train)), u("val", Some(Test))],
        num_classes: 1000,
        shape: None,
        mean: &t::IMAGENET_MEAN,
        std: &t::IMAGENET_STD,
        how_to_get: "ImageNet is not installed on these machines: arrange it as `imagenet/{train,val}/<class_name>/*.JPEG` in a data root and pass --data or set COMPACT_VISION_DATA.",
    },
];

/// All known datasets.
pub fn datasets() -> &'static [DatasetInfo] {
    DATASETS
}

/// Looks a dataset up by name or alias (case-insensitive).
pub fn info(name: &str) -> Result<&'static DatasetInfo> {
    let n = name.to_ascii_lowercase();
    DATASETS
        .iter()
        .find(|d| d.name == n || d.aliases.contains(&n.as_str()))
        .ok_or_else(|| {
            DataError::InvalidArgument(format!(
                "unknown dataset `{name}`; known: {}",
                DATASETS.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
            ))
        })
}

fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|s| s.lines().any(|l| l.trim() == "[workspace]"))
}

/// Workspace roots: the nearest ancestor of the current directory whose `Cargo.toml` has a
/// `[workspace]` table, and this crate's `CARGO_MANIFEST_DIR/../..` (deduplicated).
pub fn workspace_roots() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(d) = cwd.ancestors().find(|d| is_workspace_root(d)) {
            out.push(d.to_path_buf());
        }
    }
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if is_workspace_root(&compiled) {
        let compiled = compiled.canonicalize().unwrap_or(compiled);
        push_unique(&mut out, compiled);
    }
    out
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn push_unique(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.iter().any(|q| same_path(q, &p)) {
        v.push(p);
    }
}

/// Data roots in search order (see the [module documentation](self)); non-existent
/// directories are kept so error messages can list them.
pub fn search_roots(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = explicit {
        push_unique(&mut roots, p.to_path_buf());
    }
    if let Some(v) = std::env::var_os(DATA_ENV) {
        for p in std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()) {
            push_unique(&mut roots, p);
        }
    }
    for ws in workspace_roots() {
        push_unique(&mut roots, ws.join("datasets"));
        let shared = ws.join("../shared/datasets");
        push_unique(&mut roots, shared.canonicalize().unwrap_or(shared));
    }
    push_unique(&mut roots, PathBuf::from("/usr/share/datasets"));
    roots
}

fn has_split_files(dir: &Path, info: &DatasetInfo, split: Option<Split>) -> bool {
    info.files
        .iter()
        .filter(|f| f.split.is_some() && (split.is_none() || f.split == split))
        .all(|f| dir.join(f.rel).exists())
}

/// Finds the directory of dataset `name` holding the files of `split` (all splits when
/// `None`). Errors list every directory searched and how to get the data.
pub fn locate(name: &str, split: Option<Split>, data_dir: Option<&Path>) -> Result<PathBuf> {
    let info = info(name)?;
    let mut searched = Vec::new();
    for root in search_roots(data_dir) {
        for sub in info.subdirs {
            let dir = root.join(sub);
            if has_split_files(&dir, info, split) {
                return Ok(dir);
            }
            searched.push(dir);
        }
    }
    let hint = format!(
        "{} Expected files: {}.",
        info.how_to_get,
        info.files
            .iter()
            .filter(|f| f.split.is_some() && (split.is_none() || f.split == split))
            .map(|f| f.rel)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Err(DataError::NotFound {
        name: info.name.to_string(),
        searched,
        hint,
    })
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Options of [`load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Explicit data root (`--data DIR`), searched first.
    pub data_dir: Option<PathBuf>,
    /// CIFAR-100 fine (default) or coarse labels.
    pub cifar100_labels: Cifar100Labels,
    /// Image-folder preprocessing (ImageNet). `None`: shorter side 256, crop 224, random
    /// crop for the training split and centre crop for the test split.
    pub image_folder: Option<ImageFolderOptions>,
    /// Decode image-folder datasets into memory at load time instead of lazily.
    pub eager: bool,
    /// Check the sha256 of every known file before reading it.
    pub verify_checksums: bool,
}

impl LoadOptions {
    /// Options with an explicit data root (`--data DIR`); `None` keeps the default search.
    pub fn with_data_dir(dir: Option<PathBuf>) -> Self {
        LoadOptions {
            data_dir: dir,
            ..Default::default()
        }
    }
}

/// A dataset returned by [`load`]: in memory, or a lazily decoded image folder.
#[derive(Clone, Debug)]
pub enum AnyDataset {
    /// Fully decoded in memory.
    Memory(ImageDataset),
    /// Decoded per sample.
    Folder(ImageFolderDataset),
}

impl AnyDataset {
    /// The in-memory dataset, if this is one.
    pub fn as_memory(&self) -> Option<&ImageDataset> {
        match self {
            AnyDataset::Memory(d) => Some(d),
            AnyDataset::Folder(_) => None,
        }
    }
    /// Converts into an in-memory dataset (decodes an image folder with centre crops).
    pub fn into_memory(self) -> Result<ImageDataset> {
        match self {
            AnyDataset::Memory(d) => Ok(d),
            AnyDataset::Folder(f) => f.to_memory(),
        }
    }
    /// All labels in sample order.
    pub fn labels(&self) -> Vec<u32> {
        match self {
            AnyDataset::Memory(d) => d.labels.clone(),
            AnyDataset::Folder(f) => f.labels(),
        }
    }
    /// Class names (may be empty when unknown).
    pub fn class_names(&self) -> &[String] {
        match self {
            AnyDataset::Memory(d) => &d.class_names,
            AnyDataset::Folder(f) => f.class_names(),
        }
    }
    fn inner(&self) -> &dyn Dataset {
        match self {
            AnyDataset::Memory(d) => d,
            AnyDataset::Folder(f) => f,
        }
    }
}

impl Dataset for AnyDataset {
    fn name(&self) -> &str {
        self.inner().name()
    }
    fn len(&self) -> usize {
        self.inner().len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner().shape()
    }
    fn num_classes(&self) -> usize {
        self.inner().num_classes()
    }
    fn label(&self, i: usize) -> Result<u32> {
        self.inner().label(i)
    }
    fn read_into(&self, i: usize, rng: &mut dyn rand::RngCore, out: &mut [u8]) -> Result<u32> {
        self.inner().read_into(i, rng, out)
    }
    fn is_lazy(&self) -> bool {
        self.inner().is_lazy()
    }
}

const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
const FASHION: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn verify(dir: &Path, info: &DatasetInfo, split: Split) -> Result<()> {
    for kf in info.files.iter().filter(|f| f.split == Some(split)) {
        if let Some(expected) = kf.sha256 {
            let path = dir.join(kf.rel);
            let actual = sha256_file(&path)?;
            if actual != expected {
                return Err(DataError::format(
                    path,
                    format!("sha256 mismatch: expected {expected}, found {actual} (corrupt or different file)"),
                ));
            }
        }
    }
    Ok(())
}

/// Loads split `split` of the dataset `name` (see [`datasets`]).
pub fn load(name: &str, split: Split, opts: &LoadOptions) -> Result<AnyDataset> {
    let info = info(name)?;
    let dir = locate(info.name, Some(split), opts.data_dir.as_deref())?;
    if opts.verify_checksums {
        verify(&dir, info, split)?;
    }
    let ds_name = format!("{}/{}", info.name, split);
    let ds = match info.name {
        "mnist" | "fashion-mnist" | "usps" => {
            let prefix = if split == Split::Train { "train" } else { "t10k" };
            let mut ds = load_idx_images_labels_with(
                dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
                dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
                Some(10),
                &ds_name,
            )?;
            let names: &[&str] = if info.name == "fashion-mnist" { &FASHION } else { &DIGITS };
            ds.class_names = names.iter().map(|s| s.to_string()).collect();
            AnyDataset::Memory(ds)
        }
        "cifar10" => {
            let mut ds = cifar::load_cifar10(&dir, split == Split::Train)?;
            ds.name = ds_name;
            AnyDataset::Memory(ds)
        }
        "cifar100" => {
            let mut ds = cifar::load_cifar100(&dir, split == Split::Train, opts.cifar100_labels)?;
            ds.name = ds_name;
            AnyDataset::Memory(ds)
        }
        "imagenet" => {
            let fo = opts.image_folder.clone().unwrap_or(ImageFolderOptions {
                random_crop: split == Split::Train,
                ..ImageFolderOptions::default()
            });
            let sub = if split == Split::Train { "train" } else { "val" };
            let folder = ImageFolderDataset::open(dir.join(sub), fo)?.with_name(ds_name);
            if opts.eager {
                AnyDataset::Memory(folder.to_memory()?)
            } else {
                AnyDataset::Folder(folder)
            }
        }
        other => return Err(DataError::InvalidArgument(format!("no loader for dataset `{other}`"))),
    };
    Ok(ds)
}

/// Loads a dataset fully into memory (image folders are decoded with centre crops).
pub fn load_in_memory(name: &str, split: Split, opts: &LoadOptions) -> Result<ImageDataset> {
    load(name, split, opts)?.into_memory()
}

/// Result of checking one known file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileCheck {
    /// Present and the checksum matches.
    Ok,
    /// Present, no checksum known.
    Present,
    /// Present but the checksum differs.
    Mismatch {
        /// Computed sha256.
        actual: String,
    },
    /// Not there.
    Missing,
    /// Present but unreadable.
    Unreadable(String),
}

/// Status of one known file of a dataset.
#[derive(Clone, Debug)]
pub struct FileStatus {
    /// Path relative to the dataset directory.
    pub rel: &'static str,
    /// Full path, when the dataset directory was found.
    pub path: Option<PathBuf>,
    /// Split using it (`None`: optional metadata).
    pub split: Option<Split>,
    /// Expected sha256, when known.
    pub expected: Option<&'static str>,
    /// Outcome.
    pub check: FileCheck,
}

/// Where a dataset was found and whether its files are intact.
#[derive(Clone, Debug)]
pub struct DatasetStatus {
    /// Dataset name.
    pub name: &'static str,
    /// Directory holding it, if found (the first with all files of some split).
    pub location: Option<PathBuf>,
    /// Every directory that was searched.
    pub searched: Vec<PathBuf>,
    /// Per-file status (empty when not found).
    pub files: Vec<FileStatus>,
    /// How to obtain the data.
    pub how_to_get: &'static str,
}

impl DatasetStatus {
    /// Found, with every split file present and no checksum mismatch.
    pub fn is_ok(&self) -> bool {
        self.location.is_some()
            && self.files.iter().all(|f| match &f.check {
                FileCheck::Ok | FileCheck::Present => true,
                FileCheck::Missing => f.split.is_none(),
                _ => false,
            })
    }

    /// Short summary: `ok`, `missing`, `incomplete`, or `BAD CHECKSUM`.
    pub fn summary(&self) -> &'static str {
        if self.location.is_none() {
            "missing"
        } else if self
            .files
            .iter()
            .any(|f| matches!(f.check, FileCheck::Mismatch { .. } | FileCheck::Unreadable(_)))
        {
            "BAD CHECKSUM"
        } else if self.is_ok() {
            "ok"
        } else {
            "incomplete"
        }
    }
}

/// Checks every known dataset: where it is (searching `data_dir` first) and whether each
/// file's sha256 matches the manifest. Reads every found file in full.
pub fn report(data_dir: Option<&Path>) -> Vec<DatasetStatus> {
    DATASETS.iter().map(|info| status_of(info, data_dir)).collect()
}

/// [`report`] rendered as a text table (what `cargo xtask data` prints).
pub fn report_table(data_dir: Option<&Path>) -> String {
    StatusTable(&report(data_dir)).to_string()
}

/// [`report`] for one dataset.
pub fn status_of(info: &'static DatasetInfo, data_dir: Option<&Path>) -> DatasetStatus {
    let searched: Vec<PathBuf> = search_roots(data_dir)
        .iter()
        .flat_map(|r| info.subdirs.iter().map(move |s| r.join(s)))
        .collect();
    let location = [None, Some(Split::Train), Some(Split::Test)]
        .iter()
        .find_map(|&sp| searched.iter().find(|d| has_split_files(d, info, sp)))
        .cloned();
    let files = match &location {
        None => Vec::new(),
        Some(dir) => info
            .files
            .iter()
            .map(|kf| {
                let path = dir.join(kf.rel);
                let check = if !path.exists() {
                    FileCheck::Missing
                } else if let Some(expected) = kf.sha256 {
                    match sha256_file(&path) {
                        Ok(a) if a == expected => FileCheck::Ok,
                        Ok(actual) => FileCheck::Mismatch { actual },
                        Err(e) => FileCheck::Unreadable(e.to_string()),
                    }
                } else {
                    FileCheck::Present
                };
                FileStatus {
                    rel: kf.rel,
                    path: Some(path),
                    split: kf.split,
                    expected: kf.sha256,
                    check,
                }
            })
            .collect(),
    };
    DatasetStatus {
        name: info.name,
        location,
        searched,
        files,
        how_to_get: info.how_to_get,
    }
}

impl fmt::Display for DatasetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => writeln!(f, "{:<14} {:<12} {}", self.name, self.summary(), loc.display())?,
            None => {
                writeln!(f, "{:<14} {:<12} not found; searched:", self.name, self.summary())?;
                for s in &self.searched {
                    writeln!(f, "{:<27} {}", "", s.display())?;
                }
                writeln!(f, "{:<27} {}", "", self.how_to_get)?;
            }
        }
        for file in &self.files {
            let what = match &file.check {
                FileCheck::Ok => "sha256 ok".to_string(),
                FileCheck::Present => "present (no checksum known)".to_string(),
                FileCheck::Mismatch { actual } => {
                    format!("SHA256 MISMATCH: expected {}, found {actual}", file.expected.unwrap_or("?"))
                }
                FileCheck::Missing if file.split.is_none() => "missing (optional)".to_string(),
                FileCheck::Missing => "MISSING".to_string(),
                FileCheck::Unreadable(e) => format!("UNREADABLE: {e}"),
            };
            writeln!(f, "    {:<32} {what}", file.rel)?;
        }
        Ok(())
    }
}

/// Table of [`DatasetStatus`] rows, for `cargo xtask data`.
pub struct StatusTable<'a>(pub &'a [DatasetStatus]);

impl fmt::Display for StatusTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14} {:<12} location", "dataset", "status")?;
        for s in self.0 {
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::{IdxArray, IdxData};
    use crate::data::test_util::{gzip, TempDir};

    #[test]
    fn names_splits_and_roots() {
        assert_eq!(info("Fashion_MNIST").unwrap().name, "fashion-mnist");
        assert!(info("svhn").unwrap_err().to_string().contains("known: mnist"));
        assert_eq!("val".parse::<Split>().unwrap(), Split::Test);
        assert!("dev".parse::<Split>().is_err());
        let roots = search_roots(Some(Path::new("/explicit/dir")));
        assert_eq!(roots[0], Path::new("/explicit/dir"));
        assert_eq!(roots.last().unwrap(), Path::new("/usr/share/datasets"));
        assert!(roots
            .iter()
            .any(|r| r.ends_with("datasets") && r.parent().is_some_and(is_workspace_root)));
        assert!(!workspace_roots().is_empty());
    }

    #[test]
    fn explicit_dir_first_and_clear_not_found() {
        let dir = TempDir::new("registry");
        let cifar = dir.path().join("cifar-100-binary");
        std::fs::create_dir_all(&cifar).unwrap();
        let mut rec = vec![3u8, 42];
        rec.extend(vec![7u8; 3072]);
        std::fs::write(cifar.join("test.bin"), &rec).unwrap();
        let opts = LoadOptions {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let ds = load("cifar100", Split::Test, &opts).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.labels()), (1, 100, vec![42]));
        let coarse = LoadOptions {
            cifar100_labels: Cifar100Labels::Coarse,
            ..opts.clone()
        };
        assert_eq!(load("cifar100", Split::Test, &coarse).unwrap().labels(), vec![3]);
        // Train split is missing: the error lists the searched places and the hint.
        let e = load("cifar100", Split::Train, &opts).unwrap_err().to_string();
        assert!(e.contains(&cifar.display().to_string()), "{e}");
        assert!(e.contains("/usr/share/datasets/cifar-100-binary"), "{e}");
        assert!(e.contains("train.bin") && e.contains("cifar-100-binary.tar.gz"), "{e}");
        // A checksum mismatch is caught when verification is requested.
        let m = dir.path().join("mnist");
        std::fs::create_dir_all(&m).unwrap();
        let imgs = IdxArray {
            dims: vec![1, 28, 28],
            data: IdxData::U8(vec![0; 784]),
        };
        let labs = IdxArray {
            dims: vec![1],
            data: IdxData::U8(vec![5]),
        };
        std::fs::write(m.join("t10k-images-idx3-ubyte.gz"), gzip(&imgs.to_bytes().unwrap())).unwrap();
        std::fs::write(m.join("t10k-labels-idx1-ubyte.gz"), gzip(&labs.to_bytes().unwrap())).unwrap();
        let ds = load("mnist", Split::Test, &opts).unwrap();
        assert_eq!((ds.len(), ds.class_names()[5].as_str()), (1, "5"));
        let v = LoadOptions {
            verify_checksums: true,
            ..opts.clone()
        };
        let e = load("mnist", Split::Test, &v).unwrap_err().to_string();
        assert!(e.contains("sha256 mismatch") && e.contains("t10k-images-idx3-ubyte.gz"), "{e}");
        let st = status_of(info("mnist").unwrap(), Some(dir.path()));
        // The fake test-only folder is not complete, so a complete copy elsewhere wins, or
        // this one is reported with its missing / mismatching files.
        if st.location.as_deref() == Some(m.as_path()) {
            assert_eq!(st.summary(), "BAD CHECKSUM");
        }
    }

    #[test]
    fn imagenet_layout_lazy_and_eager() {
        let dir = TempDir::new("registry_inet");
        for (split, classes) in [("train", ["n01", "n02"]), ("val", ["n01", "n02"])] {
            for (k, c) in classes.iter().enumerate() {
                let d = dir.path().join("imagenet").join(split).join(c);
                std::fs::create_dir_all(&d).unwrap();
                for i in 0..2 {
                    let img = image::RgbImage::from_pixel(12 + i, 10, image::Rgb([k as u8 * 100, 50, 0]));
                    img.save(d.join(format!("x{i}.JPEG"))).unwrap();
                }
            }
        }
        let fo = ImageFolderOptions {
            resize_shorter: 10,
            crop: 8,
            random_crop: false,
            max_per_class: Some(1),
        };
        let opts = LoadOptions {
            data_dir: Some(dir.path().to_path_buf()),
            image_folder: Some(fo),
            ..Default::default()
        };
        let lazy = load("imagenet", Split::Test, &opts).unwrap();
        assert!(lazy.is_lazy());
        assert_eq!((lazy.len(), lazy.shape(), lazy.labels()), (2, (3, 8, 8), vec![0, 1]));
        let eager = load("imagenet", Split::Train, &LoadOptions { eager: true, ..opts }).unwrap();
        let m = eager.as_memory().unwrap();
        assert_eq!((m.len(), m.class_names.clone()), (2, vec!["n01".to_string(), "n02".to_string()]));
        assert!(m.image(1)[0] > 80, "class n02 is red-ish");
    }

    #[test]
    fn report_lists_every_dataset() {
        // Uses an empty explicit root: the report must still cover every dataset and say
        // where it looked; checksums of real files found elsewhere are verified.
        let dir = TempDir::new("registry_report");
        let rows = report(Some(dir.path()));
        assert_eq!(rows.len(), datasets().len());
        let table = StatusTable(&rows).to_string();
        for d in datasets() {
            assert!(table.contains(d.name), "{table}");
        }
        let c100 = rows.iter().find(|r| r.name == "cifar100").unwrap();
        if c100.location.is_none() {
            assert!(c100.searched.iter().any(|p| p.starts_with(dir.path())));
            assert!(table.contains("not found"));
        }
        eprintln!("{table}");
        for r in &rows {
            assert!(!matches!(r.summary(), "BAD CHECKSUM"), "{r}");
        }
    }
}
