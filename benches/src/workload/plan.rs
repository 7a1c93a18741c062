//! A read plan: what a starting program reads, recorded when the workload is
//! generated (ranges and the BLAKE3 of the bytes found there) and replayed
//! against a copy of the image, a mount, or a peer's mount. Replaying checks
//! every byte, so a mode that serves wrong data fails instead of looking fast.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One read of the plan: `len` bytes at `offset` of `path`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlannedRead {
    pub path: String,
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
}

/// What a startup reads, and the directories it lists (and stats) first.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub list_dirs: Vec<String>,
    pub reads: Vec<PlannedRead>,
}

impl Plan {
    /// Records a read of `len` bytes at `offset` of `rel` under `root`.
    pub fn record(&mut self, root: &Path, rel: &str, offset: u64, len: u64) -> Result<()> {
        let f = std::fs::File::open(root.join(rel))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        self.reads.push(PlannedRead {
            path: rel.into(),
            offset,
            len,
            blake3: blake3::hash(&buf).to_hex().to_string(),
        });
        Ok(())
    }

    /// Bytes the plan reads.
    pub fn read_bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.len).sum()
    }

    /// Reads the plan under `root` the way a starting program would and
    /// checks every byte. Returns the bytes read.
    pub fn execute(&self, root: &Path) -> Result<u64> {
        for d in &self.list_dirs {
            for e in std::fs::read_dir(root.join(d)).with_context(|| format!("listing {d}"))? {
                std::fs::symlink_metadata(e?.path())?;
            }
        }
        let mut open: Option<(&str, std::fs::File)> = None;
        for r in &self.reads {
            if open.as_ref().map(|o| o.0) != Some(r.path.as_str()) {
                let f = std::fs::File::open(root.join(&r.path))
                    .with_context(|| format!("opening {}", r.path))?;
                open = Some((&r.path, f));
            }
            let f = &open.as_ref().expect("opened above").1;
            let mut buf = vec![0u8; r.len as usize];
            f.read_exact_at(&mut buf, r.offset)
                .with_context(|| format!("reading {} at {}", r.path, r.offset))?;
            if blake3::hash(&buf).to_hex().as_str() != r.blake3 {
                bail!(
                    "{} at {} does not hold the expected bytes",
                    r.path,
                    r.offset
                );
            }
        }
        Ok(self.read_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_it_recorded_and_catches_changed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pkg")).unwrap();
        std::fs::write(dir.path().join("pkg/a.py"), b"import os\n".repeat(100)).unwrap();
        let mut plan = Plan {
            list_dirs: vec!["pkg".into()],
            ..Default::default()
        };
        plan.record(dir.path(), "pkg/a.py", 10, 200).unwrap();
        assert_eq!(plan.execute(dir.path()).unwrap(), 200);
        std::fs::write(dir.path().join("pkg/a.py"), b"import re\n".repeat(100)).unwrap();
        assert!(plan.execute(dir.path()).is_err());
    }
}
