//! Error type of the data module.

use std::path::PathBuf;

/// Result alias used throughout [`crate::data`].
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while finding, reading, decoding or batching data.
///
/// Every variant that concerns a file carries its path, and the message says what is wrong,
/// so a user can act on it without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The operating system refused to read a file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory that could not be read.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes of a file do not follow the expected format.
    #[error("{}: {what}", path.display())]
    Format {
        /// File with the malformed content.
        path: PathBuf,
        /// Human-readable description of the problem.
        what: String,
    },
    /// An image file could not be decoded.
    #[error("{}: cannot decode image: {what}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What the decoder reported.
        what: String,
    },
    /// A dataset could not be found in any of the searched places.
    #[error("dataset `{name}` not found; looked in:\n{}\n{hint}", searched.iter().map(|p| format!("  - {}", p.display())).collect::<Vec<_>>().join("\n"))]
    NotFound {
        /// Dataset name.
        name: String,
        /// Every directory that was searched, in order.
        searched: Vec<PathBuf>,
        /// How to obtain the data.
        hint: String,
    },
    /// A caller passed an argument that cannot be honoured (bad split, batch size 0, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tensor operation failed while assembling a batch.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    /// Build a [`DataError::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            what: what.into(),
        }
    }

    /// Build a [`DataError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
