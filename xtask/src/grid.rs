//! Names of results sections: a run's section is keyed by its directory name ([`run_name`]);
//! a multi-seed grid (bnn experiments, adder comparison) that is split over processes (by
//! seeds or by methods) must not replace the table of the whole grid.

use std::path::Path;

/// The section key of a run: the last component of its output directory (`run` for a path
/// without one, such as `/`).
pub fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(|| "run".to_string(), |n| n.to_string_lossy().into_owned())
}

/// `base` for the default seeds 0, 1, 2, else `base-seeds-<list>`: a grid rerun over fewer
/// seeds (to continue it, or split over processes) must not replace the table of all three.
pub fn seeded_section(base: &str, seeds: &[u64]) -> String {
    if seeds == [0, 1, 2] {
        base.to_string()
    } else {
        let list: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        format!("{base}-seeds-{}", list.join("-"))
    }
}

/// Whether `chosen` includes every entry of the comma-separated `all` (in any order): only
/// such a grid writes the experiment's table.
pub fn covers_all(all: &str, chosen: &[String]) -> bool {
    all.split(',').all(|m| chosen.iter().any(|x| x == m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_are_the_directory_and_seed_lists_name_partial_grids() {
        assert_eq!(run_name(Path::new("runs/r20-cifar10-he2016")), "r20-cifar10-he2016");
        assert_eq!(run_name(Path::new("/tmp/probe/")), "probe");
        assert_eq!(run_name(Path::new("/")), "run");
        assert_eq!(seeded_section("adder-r20", &[0, 1, 2]), "adder-r20");
        assert_eq!(seeded_section("adder-r20", &[1]), "adder-r20-seeds-1");
        assert!(covers_all("cnn,ann", &["ann".into(), "cnn".into(), "pkkd".into()]));
        assert!(!covers_all("cnn,ann,pkkd", &["ann".into()]));
    }
}
