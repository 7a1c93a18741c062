//! A three-node Garage cluster on loopback, the S3 store of the store
//! suite's S3 runs (`scripts/garage.sh`), stopped on drop. Where Garage is
//! not installed, [`Garage::start`] says SKIP loudly and gives `None`,
//! unless `THAW_REQUIRE_S3` is set (`scripts/test.sh` sets it when setup
//! installed Garage), when it fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Garage {
    dir: tempfile::TempDir,
    /// The `AWS_*` settings a client of the cluster needs.
    pub env: Vec<(String, String)>,
    /// `s3://<bucket>`: add a prefix per store.
    pub bucket_url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/garage.sh")
}

impl Garage {
    /// Starts a cluster for `test`; `None` (after a SKIP line) without Garage.
    pub fn start(test: &str) -> Option<Garage> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/garage.sh");
        if !out.status.success() {
            let why = format!(
                "no Garage cluster ({}); `scripts/garage.sh install` builds Garage once per machine",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            crate::guest::skip_unless_required("THAW_REQUIRE_S3", test, &why);
            return None;
        }
        let mut env = Vec::new();
        let mut bucket_url = String::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "THAW_S3_STORE" => bucket_url = v.to_owned(),
                _ => env.push((k.to_owned(), v.to_owned())),
            }
        }
        Some(Garage {
            dir,
            env,
            bucket_url,
        })
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}
