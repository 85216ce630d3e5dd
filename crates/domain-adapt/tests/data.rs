//! IDX target folders of any image size, resized to the source input size.

use domain_adapt::data::{idx_split_files, load_idx_dir};
use domain_adapt::LabeledImages;
use std::path::Path;

fn write_idx(dir: &Path, prefix: &str, n: usize, side: usize) {
    let mut img = vec![0, 0, 8, 3];
    for d in [n, side, side] {
        img.extend_from_slice(&(d as u32).to_be_bytes());
    }
    img.extend((0..n * side * side).map(|i| (i % 251) as u8));
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| (i % 3) as u8));
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

#[test]
fn idx_folder_of_20x20_images_is_resized_to_28x28() {
    let dir = std::env::temp_dir().join(format!("domain-adapt-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_idx(&dir, "train", 6, 20);
    let ds = load_idx_dir(&dir, true).unwrap();
    assert_eq!((ds.len(), ds.height, ds.num_classes), (6, 20, 3));
    let li = LabeledImages::from_dataset(&ds, 1, 28).unwrap();
    assert_eq!(li.images.dims(), &[6, 1, 28, 28]);
    assert_eq!(li.labels, vec![0, 1, 2, 0, 1, 2]);
    let v = li.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)), "scaled to [-1, 1]");
    // grey -> RGB replication
    assert_eq!(LabeledImages::from_dataset(&ds, 3, 28).unwrap().images.dims(), &[6, 3, 28, 28]);
    // the test split is missing: the error names the folder and the expected files
    let e = idx_split_files(&dir, false).unwrap_err().to_string();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains(&dir.display().to_string()),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
