//! `COMPACT_VISION_DATA` is searched after `--data` and before the workspace folders.
//! (Own test binary: it changes the process environment.)

use nn_core::data::registry::{locate, search_roots, DATA_ENV};
use nn_core::data::{load, Dataset, LoadOptions, Split};

#[test]
fn data_env_var_is_a_search_root() {
    let root = std::env::temp_dir().join(format!("nn-core-data-env-{}", std::process::id()));
    let dir = root.join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rec = vec![1u8, 77];
    rec.extend(vec![0u8; 3072]);
    std::fs::write(dir.join("test.bin"), &rec).unwrap();
    std::env::set_var(DATA_ENV, &root);

    let roots = search_roots(Some(std::path::Path::new("/nonexistent/explicit")));
    assert_eq!(roots[0], std::path::Path::new("/nonexistent/explicit"));
    assert_eq!(roots[1], root);
    assert_eq!(locate("cifar100", Some(Split::Test), None).unwrap(), dir);
    let ds = load("cifar100", Split::Test, &LoadOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.labels()), (1, vec![77]));

    std::env::remove_var(DATA_ENV);
    let _ = std::fs::remove_dir_all(&root);
}
