//! The client's error type.

use std::path::PathBuf;
use thaw_format::{Digest, FrameError, ManifestError, ProfileError};

/// Everything that can go wrong in push, export, inspect and mount.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid image reference {0:?}: expected [http://]HOST:PORT/NAME:TAG or HOST:PORT/NAME@blake3:<hex>")]
    BadRef(String),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} is not empty: export into a new directory")]
    NotEmpty(PathBuf),
    #[error("{0} names no tag: push needs a NAME:TAG reference")]
    TagRequired(String),
    #[error("push stopped: an upload failed")]
    Aborted,
    #[error("invalid --server {0:?}: expected [http[s]://]HOST:PORT")]
    BadServer(String),
    #[error("cannot reach the chunk server at {url}: is `thaw serve` running?")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("cannot use the CA bundle: is it PEM?")]
    BadCertificate { source: reqwest::Error },
    #[error("chunk server answered {status} for {what}: {message}")]
    Status {
        status: u16,
        what: String,
        message: String,
    },
    #[error("chunk server sent a malformed answer for {what}: {message}")]
    BadResponse { what: String, message: String },
    #[error("{what} not found on the chunk server")]
    NotFound { what: String },
    #[error("chunk server refused the manifest: {} chunks are missing", missing.len())]
    MissingChunks { missing: Vec<Digest> },
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} changed while it was being pushed; push again once it is stable")]
    Changed { path: PathBuf },
    #[error("bad chunk {id}")]
    Frame { id: Digest, source: FrameError },
    #[error("chunk {id} holds {actual} bytes but the manifest says {expected}")]
    ChunkLength {
        id: Digest,
        expected: u32,
        actual: usize,
    },
    #[error("bad manifest")]
    Manifest(#[from] ManifestError),
    #[error("bad profile")]
    Profile(#[from] ProfileError),
    #[error("none of the {} chunk servers answered ({})", servers.len(), servers.join(", "))]
    NoServerAnswered {
        servers: Vec<String>,
        /// What the last server tried said.
        source: Box<ClientError>,
    },
    #[error("gave up on {what} after {attempts} attempts")]
    GaveUp {
        what: String,
        attempts: u32,
        source: Box<ClientError>,
    },
}

impl ClientError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether trying again, or another server, may help (network trouble,
    /// timeouts, server errors, a busy server).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::NoServerAnswered { .. } => true,
            ClientError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An error and its causes, `: `-separated, for messages that cross a
/// boundary as text (a source's failure inside a fetch error).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
