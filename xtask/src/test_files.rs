//! Small dataset files in the official layouts (CIFAR-10 binary batches, ImageNet-style class
//! folders), written by tests and by `adder check-presets`, so presets can run without the real
//! datasets.

use std::path::Path;

/// A fresh, empty directory under the system temp dir, unique per test tag and process.
#[cfg(test)]
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cv-xtask-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// CIFAR-10 in the official binary layout: `<label u8><3072 bytes CHW>` records, `per_file`
/// records in each of the five training batches and the test batch.
pub fn write_cifar10(root: &Path, per_file: usize) -> std::io::Result<()> {
    let dir = root.join("cifar10/cifar-10-batches-bin");
    std::fs::create_dir_all(&dir)?;
    let record = |i: usize| {
        let mut r = vec![(i % 10) as u8];
        r.extend((0..3072).map(|j| ((i * 31 + j * 7) % 251) as u8));
        r
    };
    for f in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        let bytes: Vec<u8> = (0..per_file).flat_map(record).collect();
        std::fs::write(dir.join(f), bytes)?;
    }
    Ok(())
}

/// ImageNet-style `imagenet/{train,val}/<wnid>/*.png` with images of varying sizes.
pub fn write_imagenet(root: &Path, classes: usize, per_class: usize) -> image::ImageResult<()> {
    for split in ["train", "val"] {
        for c in 0..classes {
            let dir = root.join(format!("imagenet/{split}/n0000000{c}"));
            std::fs::create_dir_all(&dir)?;
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(64 + 8 * i as u32, 48, |x, y| {
                    image::Rgb([(x * 3) as u8, (y * 5) as u8, (c * 90) as u8])
                });
                img.save(dir.join(format!("img{i}.png")))?;
            }
        }
    }
    Ok(())
}
