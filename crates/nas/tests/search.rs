//! The search: resume without re-evaluation, and results that do not depend on the number of
//! worker threads.

mod common;

use candle_core::Device;
use nas::eval::FeatureKind;
use nas::search::{run_search, sample_candidates, Method, SearchConfig, SearchContext, SearchState};
use nas::standalone::StandaloneConfig;
use nas::supernet::{train_supernet, Supernet};
use nn_core::train::{InMemorySource, OptimizerConfig, TrainConfig};

/// A supernet trained for a few steps (so that weights differ from their initial values).
fn trained_supernet(space: &nas::SearchSpace, data: &nas::data::NasData, seed: u64) -> Supernet {
    let sn = Supernet::new(space, seed, &Device::Cpu).unwrap();
    let dir = common::tmp(&format!("sn-{seed}"));
    let mut cfg = TrainConfig::new("supernet", "synthetic", 1, &dir);
    cfg.optimizer = OptimizerConfig::sgd(0.05, 5e-4);
    cfg.quiet = true;
    let train = InMemorySource::new(data.train.images.clone(), data.train.labels.clone(), 16, true, 0).unwrap();
    train_supernet(&sn, cfg, &train).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    sn
}

fn config(method: Method) -> SearchConfig {
    SearchConfig {
        method,
        seed: 5,
        candidates: 6,
        clusters: 2,
        feature: FeatureKind::OutputChange,
        space: "tiny".into(),
        standalone: StandaloneConfig {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            weight_decay: 5e-4,
            seed: 0,
        },
        supernet_id: "test".into(),
    }
}

/// The state without timings (seconds differ between runs).
fn strip(mut s: SearchState) -> SearchState {
    s.wall_s = 0.0;
    for c in s.candidates.iter_mut() {
        if let Some(e) = c.cheap.as_mut() {
            e.seconds = 0.0;
        }
    }
    for (_, r) in s.standalone.iter_mut() {
        r.seconds = 0.0;
        r.run_dir = Default::default();
    }
    s
}

#[test]
fn a_killed_search_resumes_without_evaluating_twice() {
    let space = common::tiny_space(8);
    let data = common::tiny_data(8);
    let sn = trained_supernet(&space, &data, 0);
    let dir = common::tmp("resume");
    let ctx = |pool: &str, workers, stop_after| SearchContext {
        supernet: Some(&sn),
        space: &space,
        data: &data,
        pool: dir.join(pool),
        workers,
        stop_after,
        cheap_sources: Vec::new(),
    };
    let cfg = config(Method::Dcnas);
    // Uninterrupted reference.
    let full = run_search(&cfg, &ctx("pool-a", 2, None), &dir.join("full.json")).unwrap();
    assert_eq!(full.cheap_evaluations, 6);
    let f = &full.candidates[0].cheap.as_ref().unwrap().features;
    assert_eq!(f.len(), 8 * 8, "8 slots x 8 probe images");
    assert!(f.iter().any(|&v| v > 0.0));
    assert_eq!(full.chosen.as_ref().unwrap().len(), 2);
    assert!(full.final_result().is_some());
    // Killed after 4 cheap evaluations, then after 1 stand-alone training, then finished.
    let path = dir.join("state.json");
    let s1 = run_search(&cfg, &ctx("pool-b", 2, Some(4)), &path).unwrap();
    assert_eq!(s1.cheap_evaluations, 4);
    assert_eq!(
        SearchState::load(&path)
            .unwrap()
            .candidates
            .iter()
            .filter(|c| c.cheap.is_some())
            .count(),
        4
    );
    let s2 = run_search(&cfg, &ctx("pool-b", 1, Some(3)), &path).unwrap();
    assert_eq!(s2.cheap_evaluations, 6, "two remaining cheap evaluations only");
    assert_eq!(s2.standalone.len(), 1);
    assert!(s2.final_pick.is_none());
    let s3 = run_search(&cfg, &ctx("pool-b", 2, None), &path).unwrap();
    assert_eq!(s3.cheap_evaluations, 6);
    let (a, b) = (strip(s3.clone()), strip(full.clone()));
    assert_eq!(a.candidates, b.candidates);
    assert_eq!(
        a.clustering.as_ref().map(|k| &k.assignments),
        b.clustering.as_ref().map(|k| &k.assignments)
    );
    assert_eq!((&a.chosen, &a.standalone, a.final_pick), (&b.chosen, &b.standalone, b.final_pick));
    // A finished search evaluates nothing more.
    let s4 = run_search(&cfg, &ctx("pool-b", 2, None), &path).unwrap();
    assert_eq!(strip(s4), strip(s3));
    // Another search with the same supernet reuses the cheap evaluations of this one.
    let reuse = run_search(
        &config(Method::TopK),
        &SearchContext {
            cheap_sources: vec![dir.join("full.json")],
            ..ctx("pool-a", 2, None)
        },
        &dir.join("reuse.json"),
    )
    .unwrap();
    assert_eq!(reuse.cheap_evaluations, 0);
    assert_eq!(strip(reuse).candidates, strip(full.clone()).candidates);
    // A different search refuses the state.
    let mut other = cfg.clone();
    other.seed = 6;
    assert!(run_search(&other, &ctx("pool-b", 2, None), &path).is_err());
    // The baselines on the same budget; random needs no supernet.
    let r = run_search(
        &config(Method::Random),
        &SearchContext {
            supernet: None,
            ..ctx("pool-a", 2, None)
        },
        &dir.join("random.json"),
    )
    .unwrap();
    assert_eq!((r.cheap_evaluations, r.chosen.as_ref().unwrap().len()), (0, 2));
    let t = run_search(&config(Method::TopK), &ctx("pool-a", 2, None), &dir.join("top.json")).unwrap();
    let best = (0..6)
        .max_by(|&a, &b| {
            let (x, y) = (t.candidates[a].cheap.as_ref().unwrap(), t.candidates[b].cheap.as_ref().unwrap());
            x.val_top1
                .total_cmp(&y.val_top1)
                .then(y.val_loss.total_cmp(&x.val_loss))
                .then(b.cmp(&a))
        })
        .unwrap();
    assert_eq!(t.chosen.as_ref().unwrap()[0], best);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn results_do_not_depend_on_the_number_of_workers() {
    let space = common::tiny_space(8);
    let data = common::tiny_data(8);
    let sn = trained_supernet(&space, &data, 1);
    let dir = common::tmp("workers");
    let run = |workers: usize, name: &str| {
        let ctx = SearchContext {
            supernet: Some(&sn),
            space: &space,
            data: &data,
            pool: dir.join(format!("pool-{name}")),
            workers,
            stop_after: None,
            cheap_sources: Vec::new(),
        };
        strip(run_search(&config(Method::Dcnas), &ctx, &dir.join(format!("{name}.json"))).unwrap())
    };
    let (a, b) = (run(1, "one"), run(3, "three"));
    assert_eq!(a, b);
    assert_eq!(sample_candidates(&space, 6, 5).len(), 6);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_pool_never_serves_results_of_other_data() {
    let space = common::tiny_space(8);
    let data = common::tiny_data(8);
    let dir = common::tmp("pool-data");
    let arch = sample_candidates(&space, 1, 3).remove(0);
    let cfg = config(Method::Random).standalone;
    let first = nas::standalone::train_standalone(&space, &arch, &data, &cfg, &dir).unwrap();
    assert_eq!(first.data_id, data.id);
    // The same data: the cached result comes back (no training: the same run directory, same numbers).
    let again = nas::standalone::train_standalone(&space, &arch, &data, &cfg, &dir).unwrap();
    assert_eq!(
        (again.val_top1, again.test_top1, again.seconds),
        (first.val_top1, first.test_top1, first.seconds)
    );
    // Other subsets of the same dataset: refused, naming both and the fix.
    let mut other = data.clone();
    other.id = format!("{} (other subsets)", data.id);
    let err = nas::standalone::train_standalone(&space, &arch, &other, &cfg, &dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(other subsets)") && err.contains(&data.id) && err.contains("another --pool"),
        "{err}"
    );
    // Another training config: refused too.
    let longer = StandaloneConfig { epochs: 2, ..cfg };
    assert!(nas::standalone::train_standalone(&space, &arch, &data, &longer, &dir).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
