//! The ImageNet preset (MobileNetV2 space at 224x224) runs one supernet step and one cheap
//! evaluation on generated class folders (tiny PNGs in `imagenet/{train,val}/<class>/`).

mod common;

use candle_core::Device;
use nas::data::{DataSizes, NasData};
use nas::eval::{cheap_eval, FeatureKind};
use nas::presets;
use nas::supernet::{path_at, train_supernet, Supernet};
use nn_core::train::{InMemorySource, OptimizerConfig, TrainConfig};
use std::path::Path;

fn write_imagenet(root: &Path, classes: usize, per_class: usize) {
    for split in ["train", "val"] {
        for c in 0..classes {
            let dir = root.join(format!("imagenet/{split}/n0000000{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(240 + 8 * i as u32, 230, |x, y| {
                    image::Rgb([(x * 3) as u8, (y * 5) as u8, (c * 90 + i * 7) as u8])
                });
                img.save(dir.join(format!("img{i}.png"))).unwrap();
            }
        }
    }
}

#[test]
fn imagenet_preset_runs_one_step_on_generated_files() {
    let root = common::tmp("imagenet");
    write_imagenet(&root, 2, 3);
    let p = presets::preset("imagenet-mbv2").unwrap();
    let sizes = DataSizes {
        train: 4,
        val: 2,
        test: 2,
        probe: 2,
        calib: 4,
    };
    let data = NasData::load(p.dataset, Some(root.clone()), &sizes, 0, &Device::Cpu).unwrap();
    assert_eq!(data.train.images.dims(), &[4, 3, 224, 224]);
    let space = presets::space(p.name, data.num_classes).unwrap();
    let sn = Supernet::new(&space, 0, &Device::Cpu).unwrap();
    let mut cfg = TrainConfig::new("supernet", "imagenet", 1, root.join("run"));
    cfg.optimizer = OptimizerConfig::sgd(0.05, 4e-5);
    cfg.batch_size = 2;
    cfg.quiet = true;
    cfg.stop_after_steps = Some(1);
    let train = InMemorySource::new(data.train.images.clone(), data.train.labels.clone(), 2, true, 0).unwrap();
    let s = train_supernet(&sn, cfg, &train).unwrap();
    assert_eq!(s.epochs_completed, 0);
    assert!(s.train_loss.is_none() || s.train_loss.unwrap().is_finite());
    let arch = path_at(&space, 0, 1);
    let e = cheap_eval(&sn, &arch, &data, FeatureKind::OutputChange).unwrap();
    assert_eq!(e.features.len(), 21 * 2);
    assert!((0.0..=100.0).contains(&e.val_top1));
    assert!(presets::preset("imagenet").is_err());
    std::fs::remove_dir_all(&root).ok();
}
