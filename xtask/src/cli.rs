//! Command-line option groups shared by the experiment runners, flattened into their `Args`
//! structs so every runner spells, documents and applies them the same way.

use clap::Args;
use nn_core::experiment::DataSpec;
use std::path::PathBuf;

/// Where a run finds its data and which class-balanced subsets of it it uses.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct DataArgs {
    /// Data root searched first (then $COMPACT_VISION_DATA, datasets/, ../shared/datasets,
    /// /usr/share/datasets); e.g. one holding `cifar10/` or `imagenet/{train,val}`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Train on a class-balanced subset of this many training images.
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// Evaluate on a class-balanced subset of this many test images.
    #[arg(long)]
    pub test_subset: Option<usize>,
}

impl DataArgs {
    /// Points `spec` at this data root and these subsets.
    pub fn apply_to(&self, spec: &mut DataSpec) {
        spec.data_dir = self.data.clone();
        spec.train_subset = self.train_subset;
        spec.test_subset = self.test_subset;
    }

    /// A [`DataSpec`] for `dataset` with these options applied.
    pub fn spec(&self, dataset: &str, batch_size: usize, seed: u64) -> DataSpec {
        let mut spec = DataSpec::new(dataset, batch_size, seed);
        self.apply_to(&mut spec);
        spec
    }

    /// The subsets in words for a results note; empty when the full splits are used.
    pub fn subset_note(&self) -> String {
        let train = self.train_subset.map(|n| format!("Class-balanced training subset of {n} images."));
        let test = self.test_subset.map(|n| format!("Class-balanced test subset of {n} images."));
        [train, test].into_iter().flatten().collect::<Vec<_>>().join(" ")
    }

    /// The subsets as a clause to append to a sentence (", class-balanced training subset of
    /// N images, test subset of M images"); empty when the full splits are used.
    pub fn subset_clause(&self) -> String {
        let train = self
            .train_subset
            .map_or(String::new(), |n| format!(", class-balanced training subset of {n} images"));
        let test = self.test_subset.map_or(String::new(), |n| format!(", test subset of {n} images"));
        train + &test
    }

    /// Appends [`Self::subset_note`] to `notes`, separated by a space, when there is one.
    pub fn append_subset_note(&self, notes: &mut String) {
        let s = self.subset_note();
        if !s.is_empty() {
            if !notes.is_empty() {
                notes.push(' ');
            }
            notes.push_str(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        data: DataArgs,
    }

    #[test]
    fn parses_applies_and_describes() {
        let cli = Cli::try_parse_from(["x", "--data", "/d", "--train-subset", "100"]).unwrap();
        assert_eq!(cli.data.data, Some(PathBuf::from("/d")));
        assert_eq!(cli.data.test_subset, None);
        let spec = cli.data.spec("mnist", 32, 7);
        assert_eq!((spec.train_subset, spec.test_subset, spec.seed), (Some(100), None, 7));
        assert_eq!(spec.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(cli.data.subset_note(), "Class-balanced training subset of 100 images.");
        let mut notes = String::from("Note.");
        cli.data.append_subset_note(&mut notes);
        assert_eq!(notes, "Note. Class-balanced training subset of 100 images.");
        assert_eq!(DataArgs::default().subset_note(), "");
        assert_eq!(DataArgs::default().subset_clause(), "");
        let both = DataArgs {
            train_subset: Some(5),
            test_subset: Some(6),
            ..Default::default()
        };
        assert_eq!(
            both.subset_clause(),
            ", class-balanced training subset of 5 images, test subset of 6 images"
        );
        assert!(Cli::try_parse_from(["x", "--train-subset", "many"]).is_err());
    }
}
