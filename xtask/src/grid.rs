//! Results sections of multi-seed grids (bnn experiments, adder comparison): a grid that is
//! split over processes (by seeds or by methods) must not replace the table of the whole grid.

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
