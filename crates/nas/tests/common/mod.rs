//! Small synthetic data and a tiny space for fast tests.
#![allow(dead_code)]

use candle_core::Device;
use nas::data::{DataSizes, NasData};
use nas::SearchSpace;
use nn_core::data::ImageDataset;

/// A learnable synthetic dataset: class `c` brightens a class-specific quadrant.
pub fn synthetic(n: usize, channels: usize, size: usize, classes: usize, seed: u64) -> ImageDataset {
    let mut labels = Vec::with_capacity(n);
    let mut images = Vec::with_capacity(n * channels * size * size);
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for i in 0..n {
        let c = (i % classes) as u32;
        labels.push(c);
        for ch in 0..channels {
            for y in 0..size {
                for x in 0..size {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let noise = (s >> 58) as u8;
                    let q = (y * 2 / size) * 2 + x * 2 / size;
                    let v = if q == c as usize % 4 { 160 + ch as u8 * 10 } else { 60 };
                    images.push(v.saturating_add(noise));
                }
            }
        }
    }
    ImageDataset::new("synthetic", channels, size, size, classes, images, labels, Vec::new()).unwrap()
}

pub fn tiny_data(size: usize) -> NasData {
    let train = synthetic(200, 3, size, 4, 1);
    let test = synthetic(40, 3, size, 4, 2);
    let sizes = DataSizes {
        train: 120,
        val: 40,
        test: 40,
        probe: 8,
        calib: 32,
    };
    NasData::from_datasets("synthetic", &train, &test, &sizes, 0, &Device::Cpu).unwrap()
}

/// The small space on `size`x`size` inputs with 4 classes.
pub fn tiny_space(size: usize) -> SearchSpace {
    SearchSpace::small("tiny", 3, size, 4)
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("nas-test-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&p).ok();
    std::fs::create_dir_all(&p).unwrap();
    p
}
