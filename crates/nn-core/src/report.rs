//! Results pages: every experiment writes its own section of `docs/results/<crate>.md`,
//! replacing the previous section of the same run and leaving the others untouched.

use std::path::{Path, PathBuf};

/// The workspace root: the nearest ancestor of the current directory whose `Cargo.toml`
/// declares `[workspace]`, else the directory above this crate.
pub fn workspace_root() -> PathBuf {
    if let Ok(mut dir) = std::env::current_dir() {
        loop {
            let manifest = dir.join("Cargo.toml");
            if std::fs::read_to_string(&manifest)
                .map(|s| s.contains("[workspace]"))
                .unwrap_or(false)
            {
                return dir;
            }
            if !dir.pop() {
                break;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes (or replaces) the section `key` of the markdown page `page` (a path relative to the
/// workspace root, e.g. `docs/results/nn-core.md`), creating the page with `title` if needed.
/// Sections are delimited by HTML comments so a rerun replaces its own section only. The page
/// is written atomically.
pub fn write_section(page: &str, title: &str, key: &str, body: &str) -> std::io::Result<PathBuf> {
    let path = workspace_root().join(page);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        format!("# {title}\n\nEvery section below was written by the run it describes; rerun its command to reproduce it.\n")
    });
    let begin = format!("<!-- begin {key} -->");
    let end = format!("<!-- end {key} -->");
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The command line that started this process, for reproduction notes: arguments a shell
/// would split or interpret are single-quoted, so the line can be pasted back as it is.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let exe = std::env::args().next().unwrap_or_default();
    if exe.contains("xtask") {
        format!("cargo xtask {}", args.join(" "))
    } else {
        format!("{} {}", shell_quote(&exe), args.join(" "))
    }
}

/// `arg` as one POSIX shell word: unchanged when it holds only characters no shell treats
/// specially, otherwise in single quotes (a `'` inside written as `'\''`).
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,:=+%@".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        use super::shell_quote;
        assert_eq!(shell_quote("--epochs"), "--epochs");
        assert_eq!(shell_quote("runs/r20-s0"), "runs/r20-s0");
        assert_eq!(shell_quote("0,1,2"), "0,1,2");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a run (load 2.1)"), "'a run (load 2.1)'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$HOME;x"), "'$HOME;x'");
    }

    #[test]
    fn sections_are_replaced_not_duplicated() {
        let page = format!("target/tmp-report-{}.md", std::process::id());
        let p = super::write_section(&page, "T", "run-a", "first A").unwrap();
        super::write_section(&page, "T", "run-b", "first B").unwrap();
        super::write_section(&page, "T", "run-a", "second A").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        std::fs::remove_file(&p).ok();
        assert!(s.contains("second A") && s.contains("first B") && !s.contains("first A"), "{s}");
        assert_eq!(s.matches("<!-- begin run-a -->").count(), 1);
    }
}
