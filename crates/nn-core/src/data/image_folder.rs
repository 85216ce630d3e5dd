//! ImageNet-style class-folder datasets.
//!
//! Layout: `root/<split>/<class_name>/<image>.{JPEG,jpg,jpeg,png}`. Classes are the
//! sub-directories of the split directory sorted by name (label = rank in that order);
//! files inside a class are sorted by name too, so the sample order is reproducible.
//!
//! Each image is decoded with the `image` crate, converted to RGB, resized so that its
//! shorter side is `resize_shorter` pixels (bilinear with antialiasing, the `image` crate's
//! triangle filter), then cropped to `crop x crop`: in the centre for evaluation, at a
//! uniformly random position for training. The result is a CHW `u8` buffer.
//!
//! [`ImageFolderDataset`] decodes lazily, one sample at a time in the loader (which does it
//! in parallel); [`ImageFolderDataset::to_memory`] decodes everything eagerly into an
//! [`ImageDataset`] for small sets.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rand::{Rng, RngCore};
use rayon::prelude::*;

use super::{DataError, Dataset, ImageDataset, Result};

/// File extensions (lower-cased) recognised as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpeg", "jpg", "png"];

/// How images of a folder dataset are listed, resized and cropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFolderOptions {
    /// Length of the shorter side after resizing (`S`). Must be `>= crop`.
    pub resize_shorter: usize,
    /// Side of the square crop (`C`).
    pub crop: usize,
    /// Random crop position (training) instead of the centre (evaluation).
    pub random_crop: bool,
    /// Keep at most this many files per class (the first ones in name order).
    pub max_per_class: Option<usize>,
}

impl Default for ImageFolderOptions {
    /// The usual ImageNet evaluation preprocessing: shorter side 256, centre crop 224.
    fn default() -> Self {
        ImageFolderOptions {
            resize_shorter: 256,
            crop: 224,
            random_crop: false,
            max_per_class: None,
        }
    }
}

/// A lazily decoded class-folder dataset.
#[derive(Clone, Debug)]
pub struct ImageFolderDataset {
    name: String,
    root: PathBuf,
    files: Vec<(PathBuf, u32)>,
    class_names: Vec<String>,
    opts: ImageFolderOptions,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks: data folders are often links.
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_image_file(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((_, ext)) => IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()),
        None => false,
    }
}

impl ImageFolderDataset {
    /// Lists `split_dir/<class>/<images>`. Fails if the directory is unreadable, has no
    /// class directory, or contains no image at all.
    pub fn open(split_dir: impl AsRef<Path>, opts: ImageFolderOptions) -> Result<Self> {
        let root = split_dir.as_ref().to_path_buf();
        if opts.crop == 0 || opts.resize_shorter < opts.crop {
            return Err(DataError::InvalidArgument(format!(
                "image folder {}: need 0 < crop ({}) <= resize_shorter ({})",
                root.display(),
                opts.crop,
                opts.resize_shorter
            )));
        }
        let mut class_names = Vec::new();
        let mut files = Vec::new();
        for (name, path, is_dir) in read_dir_sorted(&root)? {
            if !is_dir {
                continue;
            }
            let label = class_names.len() as u32;
            let mut n = 0;
            for (fname, fpath, fdir) in read_dir_sorted(&path)? {
                if fdir || !is_image_file(&fname) {
                    continue;
                }
                if opts.max_per_class.is_some_and(|m| n >= m) {
                    break;
                }
                files.push((fpath, label));
                n += 1;
            }
            class_names.push(name);
        }
        if class_names.is_empty() {
            return Err(DataError::format(
                &root,
                "no class sub-directory (expected <split>/<class_name>/<image files>)",
            ));
        }
        if files.is_empty() {
            return Err(DataError::format(
                &root,
                format!("{} class directories but no .JPEG/.jpg/.png file in them", class_names.len()),
            ));
        }
        let name = root.display().to_string();
        Ok(ImageFolderDataset {
            name,
            root,
            files,
            class_names,
            opts,
        })
    }

    /// Renames the dataset (used in messages).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The split directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// `(path, label)` of every sample, in sample order.
    pub fn files(&self) -> &[(PathBuf, u32)] {
        &self.files
    }

    /// All labels in sample order.
    pub fn labels(&self) -> Vec<u32> {
        self.files.iter().map(|f| f.1).collect()
    }

    /// The preprocessing options.
    pub fn options(&self) -> &ImageFolderOptions {
        &self.opts
    }

    /// Decodes every image (centre crop, in parallel) into an in-memory dataset.
    pub fn to_memory(&self) -> Result<ImageDataset> {
        let c = self.opts.crop;
        let per = 3 * c * c;
        let mut images = vec![0u8; per * self.files.len()];
        let opts = ImageFolderOptions {
            random_crop: false,
            ..self.opts.clone()
        };
        images
            .par_chunks_mut(per)
            .zip(self.files.par_iter())
            .try_for_each(|(out, (path, _))| {
                decode_into(
                    path,
                    &opts,
                    &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0),
                    out,
                )
            })?;
        ImageDataset::new(
            self.name.clone(),
            3,
            c,
            c,
            self.class_names.len(),
            images,
            self.labels(),
            self.class_names.clone(),
        )
    }
}

/// Decodes `path`, resizes its shorter side to `opts.resize_shorter`, crops
/// `opts.crop x opts.crop` (random position if `opts.random_crop`) and writes CHW RGB bytes
/// into `out` (length `3 * crop * crop`).
pub fn decode_into(path: &Path, opts: &ImageFolderOptions, rng: &mut dyn RngCore, out: &mut [u8]) -> Result<()> {
    let img_err = |what: String| DataError::Image {
        path: path.to_path_buf(),
        what,
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let img = reader.decode().map_err(|e| img_err(e.to_string()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(img_err("image has zero size".into()));
    }
    let s = opts.resize_shorter;
    let (nw, nh) = if w <= h {
        (s, ((h as f64 * s as f64 / w as f64).round() as usize).max(s))
    } else {
        (((w as f64 * s as f64 / h as f64).round() as usize).max(s), s)
    };
    let (nw32, nh32) = (
        u32::try_from(nw).map_err(|_| img_err(format!("resized width {nw} too large")))?,
        u32::try_from(nh).map_err(|_| img_err(format!("resized height {nh} too large")))?,
    );
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, nw32, nh32, FilterType::Triangle)
    };
    let c = opts.crop;
    let (x0, y0) = if opts.random_crop {
        (rng.gen_range(0..=nw - c), rng.gen_range(0..=nh - c))
    } else {
        ((nw - c) / 2, (nh - c) / 2)
    };
    if out.len() != 3 * c * c {
        return Err(DataError::InvalidArgument(format!(
            "output buffer of {} bytes for a 3x{c}x{c} crop",
            out.len()
        )));
    }
    let raw = resized.as_raw();
    let plane = c * c;
    for y in 0..c {
        let row = &raw[((y0 + y) * nw + x0) * 3..((y0 + y) * nw + x0 + c) * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            out[y * c + x] = px[0];
            out[plane + y * c + x] = px[1];
            out[2 * plane + y * c + x] = px[2];
        }
    }
    Ok(())
}

impl Dataset for ImageFolderDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.files.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, self.opts.crop, self.opts.crop)
    }
    fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    fn label(&self, i: usize) -> Result<u32> {
        self.files
            .get(i)
            .map(|f| f.1)
            .ok_or_else(|| DataError::InvalidArgument(format!("{}: index {i} out of range (len {})", self.name, self.files.len())))
    }
    fn read_into(&self, i: usize, rng: &mut dyn RngCore, out: &mut [u8]) -> Result<u32> {
        let label = self.label(i)?;
        decode_into(&self.files[i].0, &self.opts, rng, out)?;
        Ok(label)
    }
    fn is_lazy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Writes `root/train/{cat,ant,bee}` with PNGs and JPEGs of solid colours.
    pub(crate) fn write_folder(root: &Path) {
        let colours = [("cat", [200u8, 10, 10]), ("ant", [10, 200, 10]), ("bee", [10, 10, 200])];
        for (k, (class, rgb)) in colours.iter().enumerate() {
            let dir = root.join("train").join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..3 {
                let (w, h) = (40 + 8 * i, 30 + 4 * k as u32);
                let img = image::RgbImage::from_pixel(w, h, image::Rgb(*rgb));
                let ext = if i == 1 { "JPEG" } else { "png" };
                img.save(dir.join(format!("img{i}.{ext}"))).unwrap();
            }
            std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        }
        std::fs::create_dir_all(root.join("train/.hidden")).unwrap();
    }

    #[test]
    fn lists_sorted_classes_and_decodes() {
        let dir = TempDir::new("imgfolder");
        write_folder(dir.path());
        let opts = ImageFolderOptions {
            resize_shorter: 24,
            crop: 20,
            random_crop: false,
            max_per_class: None,
        };
        let ds = ImageFolderDataset::open(dir.path().join("train"), opts.clone()).unwrap();
        assert_eq!(ds.class_names(), &["ant", "bee", "cat"]);
        assert_eq!(ds.len(), 9);
        assert_eq!(ds.labels(), vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(ds.shape(), (3, 20, 20));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Sample 0 is ant/img0.png: solid green, CHW planes.
        let (px, l) = ds.get(0, &mut rng).unwrap();
        assert_eq!(l, 0);
        assert!(px[..400].iter().all(|&v| v == 10) && px[400..800].iter().all(|&v| v == 200));
        // JPEG decodes approximately.
        let (px, l) = ds.get(7, &mut rng).unwrap();
        assert_eq!(l, 2);
        assert!(px[..400].iter().all(|&v| v > 180) && px[800..].iter().all(|&v| v < 40));
        let mem = ds.to_memory().unwrap();
        assert_eq!((mem.len(), mem.num_classes, mem.height), (9, 3, 20));
        assert_eq!(mem.class_counts(), vec![3, 3, 3]);
        let capped = ImageFolderDataset::open(
            dir.path().join("train"),
            ImageFolderOptions {
                max_per_class: Some(2),
                random_crop: true,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(capped.labels(), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(capped.files()[1].0.file_name().unwrap(), "img1.JPEG");
        assert!(capped.get(3, &mut rng).is_ok());
    }

    #[test]
    fn crop_position_and_resize_geometry() {
        let dir = TempDir::new("imgcrop");
        let d = dir.path().join("val/only");
        std::fs::create_dir_all(&d).unwrap();
        // 8x4 image whose columns encode x in the red channel.
        let img = image::RgbImage::from_fn(8, 4, |x, _| image::Rgb([x as u8 * 30, 0, 0]));
        img.save(d.join("a.png")).unwrap();
        let opts = ImageFolderOptions {
            resize_shorter: 4,
            crop: 4,
            random_crop: false,
            max_per_class: None,
        };
        let ds = ImageFolderDataset::open(dir.path().join("val"), opts.clone()).unwrap();
        let (px, _) = ds.get(0, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        // No resize needed (shorter side already 4); centre crop keeps columns 2..6.
        assert_eq!(&px[..4], &[60, 90, 120, 150]);
        let ds = ImageFolderDataset::open(dir.path().join("val"), ImageFolderOptions { random_crop: true, ..opts }).unwrap();
        let mut starts = std::collections::HashSet::new();
        for seed in 0..64 {
            let (px, _) = ds.get(0, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            starts.insert(px[0] / 30);
        }
        assert_eq!(starts.len(), 5, "random crop covers every x offset 0..=4");
    }

    #[test]
    fn lazy_loading_is_deterministic_under_prefetch() {
        use crate::data::{DataLoader, Pipeline};
        let dir = TempDir::new("imglazy");
        for (k, class) in ["a", "b"].iter().enumerate() {
            let d = dir.path().join("train").join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..5u32 {
                let img = image::RgbImage::from_fn(20 + i, 16, |x, y| {
                    image::Rgb([(x * 12) as u8, (y * 15) as u8, (k * 90) as u8 + i as u8])
                });
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
        let opts = ImageFolderOptions {
            resize_shorter: 16,
            crop: 12,
            random_crop: true,
            max_per_class: None,
        };
        let ds = std::sync::Arc::new(ImageFolderDataset::open(dir.path().join("train"), opts).unwrap());
        let base = DataLoader::from_arc(ds, 4)
            .shuffle(true)
            .seed(5)
            .transform(Pipeline::new().hflip(0.5));
        let run = |l: &DataLoader, from: usize| {
            let mut it = l.epoch_from(1, from);
            std::iter::from_fn(|| it.next_host()).map(|b| b.unwrap()).collect::<Vec<_>>()
        };
        let reference = run(&base.clone().prefetch(0).parallel(Some(false)), 0);
        assert_eq!(reference.len(), 3);
        assert_eq!(reference[0].shape, (3, 12, 12));
        // Random crops and flips actually vary between epochs.
        let other = base.clone().prefetch(0);
        let mut it = other.epoch(2);
        let e2: Vec<_> = std::iter::from_fn(|| it.next_host()).map(|b| b.unwrap()).collect();
        assert_ne!(e2, reference);
        assert_eq!(run(&base.clone().prefetch(2).parallel(Some(true)), 0), reference);
        assert_eq!(run(&base.clone().prefetch(1), 1), reference[1..].to_vec());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = TempDir::new("imgbad");
        let d = dir.path().join("train/x");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let opts = ImageFolderOptions {
            resize_shorter: 8,
            crop: 8,
            random_crop: false,
            max_per_class: None,
        };
        let ds = ImageFolderDataset::open(dir.path().join("train"), opts.clone()).unwrap();
        let e = ds.get(0, &mut ChaCha8Rng::seed_from_u64(0)).unwrap_err().to_string();
        assert!(e.contains("broken.png"), "{e}");
        assert!(ds.to_memory().unwrap_err().to_string().contains("broken.png"));
        let e = ImageFolderDataset::open(dir.path().join("nope"), opts.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let empty = TempDir::new("imgempty");
        let e = ImageFolderDataset::open(empty.path(), opts).unwrap_err().to_string();
        assert!(e.contains("no class sub-directory"), "{e}");
    }
}
