//! Bearer tokens from a file, re-read when the file changes.
//!
//! One token per line; empty lines and `#` comments are ignored. The
//! collector accepts any token in its file, so a rotation is: add the new
//! token, roll it out to the agents, remove the old one. The agent sends the
//! first token of its file. Kubernetes Secret volumes replace the file by
//! swapping a symlink, which changes its inode; that is noticed too.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

/// How often the file's metadata is looked at, at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {what}")]
pub struct TokenError {
    pub path: PathBuf,
    pub what: String,
}

/// What identifies one version of the file.
type Stamp = (Option<SystemTime>, u64, u64);

struct Cached {
    stamp: Stamp,
    tokens: Vec<String>,
    checked: Instant,
}

pub struct TokenFile {
    path: PathBuf,
    cache: Mutex<Cached>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified().ok(), m.len(), m.ino()))
}

fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn read(path: &Path) -> Result<(Stamp, Vec<String>), TokenError> {
    let error = |what: String| TokenError {
        path: path.to_path_buf(),
        what,
    };
    let stamp = stamp(path).map_err(|e| error(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    Ok((stamp, parse(&text)))
}

/// Equal in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenFile {
    /// Reads the file; it must exist and hold at least one token.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let (stamp, tokens) = read(path)?;
        if tokens.is_empty() {
            return Err(TokenError {
                path: path.to_path_buf(),
                what: "holds no token".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            cache: Mutex::new(Cached {
                stamp,
                tokens,
                checked: Instant::now(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the current tokens, re-reading the file first if it has
    /// changed. While the file cannot be read (mid-rotation), the last
    /// tokens read stay in force.
    fn with_tokens<T>(&self, f: impl FnOnce(&[String]) -> T) -> T {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.checked.elapsed() >= CHECK_EVERY {
            cache.checked = Instant::now();
            match stamp(&self.path) {
                Ok(now) if now != cache.stamp => match read(&self.path) {
                    Ok((stamp, tokens)) => {
                        if tokens.is_empty() {
                            tracing::warn!(path = %self.path.display(), "token file now holds no token: every request is refused");
                        } else {
                            tracing::info!(path = %self.path.display(), tokens = tokens.len(), "token file re-read");
                        }
                        cache.stamp = stamp;
                        cache.tokens = tokens;
                    }
                    Err(e) => tracing::warn!("{e}; keeping the tokens read before"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    path = %self.path.display(),
                    "token file unreadable ({e}); keeping the tokens read before"
                ),
            }
        }
        f(&cache.tokens)
    }

    /// Whether `presented` is one of the file's tokens.
    pub fn accepts(&self, presented: &str) -> bool {
        self.with_tokens(|tokens| {
            // Compare with every token, so the time does not tell which matched.
            tokens
                .iter()
                .fold(false, |ok, t| same(t.as_bytes(), presented.as_bytes()) | ok)
        })
    }

    /// The token to send: the file's first.
    pub fn current(&self) -> Option<String> {
        self.with_tokens(|tokens| tokens.first().cloned())
    }

    /// Makes the next call look at the file again (tests, and callers that
    /// just learned the token was refused).
    pub fn recheck(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.checked = Instant::now() - CHECK_EVERY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_seen_without_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# agents\nold-token\n\n").unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert!(file.accepts("old-token"));
        assert!(!file.accepts("new-token"));
        assert!(!file.accepts(""));
        assert_eq!(file.current().as_deref(), Some("old-token"));

        // Rotation by replacing the file (a new inode), as Secret volumes do.
        let next = dir.path().join("tokens.next");
        std::fs::write(&next, "new-token\nold-token\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        file.recheck();
        assert!(file.accepts("new-token"));
        assert!(file.accepts("old-token"));
        assert_eq!(file.current().as_deref(), Some("new-token"));

        // The old token removed; a missing file keeps the last tokens.
        std::fs::write(&next, "new-token\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        file.recheck();
        assert!(!file.accepts("old-token"));
        std::fs::remove_file(&path).unwrap();
        file.recheck();
        assert!(file.accepts("new-token"));
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "\n# nothing\n").unwrap();
        let e = TokenFile::open(&path).err().unwrap();
        assert!(e.to_string().contains("holds no token"), "{e}");
        let e = TokenFile::open(&dir.path().join("nope")).err().unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
