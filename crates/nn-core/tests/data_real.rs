//! Real-data checks of the data module. MNIST ships with the project and is required;
//! USPS, CIFAR-10 and Fashion-MNIST are checked when present and reported as skipped
//! (with the reason) otherwise.

use std::path::{Path, PathBuf};

use nn_core::data::transforms::{MNIST_MEAN, MNIST_STD};
use nn_core::data::{load, DataLoader, Dataset, LoadOptions, Pipeline, Split};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Loads a dataset or explains why the test is skipped.
fn try_load(name: &str, split: Split) -> Option<nn_core::data::AnyDataset> {
    match load(name, split, &LoadOptions::default()) {
        Ok(ds) => Some(ds),
        Err(nn_core::data::DataError::NotFound { .. }) => {
            eprintln!("SKIPPED: dataset `{name}` ({split}) not found on this machine; see `cargo xtask data`");
            None
        }
        Err(e) => panic!("loading {name}/{split} failed: {e}"),
    }
}

#[test]
fn data_mnist_test_label_counts_and_loader() {
    let dir = workspace().join("datasets");
    assert!(
        dir.join("mnist/t10k-labels-idx1-ubyte.gz").is_file(),
        "the embedded MNIST copy is expected at {}/mnist (restore it with `git checkout -- datasets/mnist`)",
        dir.display()
    );
    let opts = LoadOptions {
        data_dir: Some(dir),
        verify_checksums: true,
        ..Default::default()
    };
    let ds = load("mnist", Split::Test, &opts).expect("load MNIST test").into_memory().unwrap();
    assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (10_000, 1, 28, 28));
    assert_eq!(ds.class_counts(), vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    let (mean, _) = ds.channel_mean_std();
    assert!((mean[0] - 0.1325).abs() < 0.002, "MNIST test mean {mean:?}");

    // One epoch with crop + flip + normalize, batch 128, on a background thread.
    let loader = DataLoader::new(ds, 128)
        .shuffle(true)
        .seed(1)
        .drop_last(false)
        .transform(Pipeline::new().random_crop(28, 2).hflip(0.5).normalize(&MNIST_MEAN, &MNIST_STD))
        .prefetch(2);
    assert_eq!(loader.len_batches(), 79);
    let t = std::time::Instant::now();
    let mut seen = 0;
    for b in loader.epoch(0) {
        let b = b.unwrap();
        assert_eq!(&b.images.dims()[1..], &[1, 28, 28]);
        seen += b.indices.len();
    }
    assert_eq!(seen, 10_000);
    eprintln!("MNIST test epoch: {:.0} images/s", 10_000.0 / t.elapsed().as_secs_f64());
}

#[test]
fn data_usps_label_counts() {
    let (Some(train), Some(test)) = (try_load("usps", Split::Train), try_load("usps", Split::Test)) else {
        return;
    };
    let tr = train.as_memory().unwrap();
    assert_eq!((tr.height, tr.width), (16, 16));
    let (mean, std) = tr.channel_mean_std();
    assert!(
        (mean[0] - nn_core::data::transforms::USPS_MEAN[0]).abs() < 1e-3,
        "USPS mean {mean:?}"
    );
    assert!((std[0] - nn_core::data::transforms::USPS_STD[0]).abs() < 1e-3, "USPS std {std:?}");
    assert_eq!(tr.class_counts(), vec![1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]);
    assert_eq!(
        test.as_memory().unwrap().class_counts(),
        vec![359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    );
}

#[test]
fn data_cifar10_test_split() {
    let Some(test) = try_load("cifar10", Split::Test) else {
        return;
    };
    let ds = test.as_memory().unwrap();
    assert_eq!((ds.len(), ds.shape()), (10_000, (3, 32, 32)));
    assert_eq!(ds.class_counts(), vec![1000; 10]);
    assert_eq!(ds.class_names[0], "airplane");
    let (mean, _) = ds.channel_mean_std();
    for (m, want) in mean.iter().zip([0.49, 0.48, 0.45]) {
        assert!((m - want).abs() < 0.02, "CIFAR-10 test means {mean:?}");
    }
}

#[test]
fn data_fashion_mnist_test_split() {
    let Some(test) = try_load("fashion-mnist", Split::Test) else {
        return;
    };
    let ds = test.as_memory().unwrap();
    assert_eq!((ds.len(), ds.shape()), (10_000, (1, 28, 28)));
    assert_eq!(ds.class_counts(), vec![1000; 10]);
}
