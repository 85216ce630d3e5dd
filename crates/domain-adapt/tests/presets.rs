//! The Office-31 / Office-Home / VisDA presets run one step of every phase on class folders
//! the test writes (tiny PNGs in `<domain>/<class>/`).

use domain_adapt::presets::{preset, PRESETS};
use domain_adapt::*;
use std::path::{Path, PathBuf};

fn write_domains(root: &Path, domains: &[&str], classes: usize, per_class: usize) {
    for (d, dom) in domains.iter().enumerate() {
        for c in 0..classes {
            let dir = root.join(dom).join(format!("class_{c:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(40, 36, |x, y| {
                    let v = |k: usize| (((c * 37 + k * 91 + d * 13 + i * 5) as u32 + x * (k as u32 + 1) + y) % 256) as u8;
                    image::Rgb([v(0), v(1), v(2)])
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("domain-adapt-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&p).ok();
    p
}

#[test]
fn every_preset_runs_one_step_of_each_phase_on_generated_folders() {
    for &name in PRESETS {
        let p = preset(name).unwrap().smoke(32, 4);
        let root = tmp(name);
        let (src, tgt) = (p.domains[0], p.domains[1]);
        write_domains(&root, &[src, tgt], p.spec.num_classes, 1);
        let source = p.load_domain(&root, src, None).unwrap();
        let target = p.load_domain(&root, tgt, None).unwrap();
        assert_eq!(source.images.dims(), &[p.spec.num_classes, 3, 32, 32]);
        let model = SourceModel::new(&p.spec, 0).unwrap();
        let r = train_source(&model, &source, &p.source).unwrap();
        assert_eq!(r.steps, 1, "{name}");
        let t = target.without_labels().unwrap();
        let (_, r) = adapt_shot_im(&model, &t, &p.shot, None).unwrap();
        assert_eq!(r.steps, 1, "{name}");
        let (adapted, r) = adapt_sfda_de(&model, &t, &p.sfda, None).unwrap();
        assert_eq!(r.steps, 1, "{name}");
        let acc = accuracy(&adapted, &target, 16).unwrap();
        assert!((0.0..=100.0).contains(&acc));
        std::fs::remove_dir_all(&root).ok();
    }
}

#[test]
fn preset_errors_name_the_problem() {
    let e = preset("office-32").unwrap_err().to_string();
    assert!(e.contains("office31, office-home, visda"), "{e}");
    let p = preset("office31").unwrap().smoke(32, 4);
    let root = tmp("bad");
    write_domains(&root, &["amazon"], 3, 1);
    let e = format!("{:#}", p.load_domain(&root, "amazon", None).err().unwrap());
    assert!(e.contains("3 class folders, the protocol has 31"), "{e}");
    let e = format!("{:#}", p.load_domain(&root, "photos", None).err().unwrap());
    assert!(e.contains("unknown domain `photos`"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}
