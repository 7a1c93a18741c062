//! The `thaw` binary as a process: run it, run a real `thaw serve` child, and
//! mount images with `thaw mount`.
//!
//! The binary is the one cargo built beside the running test or bench
//! (`target/<profile>/thaw`, the parent of the test's `deps/`), or `$THAW_BIN`.
//! A server binds port 0 and tells its port on its first line of output, so
//! tests run in parallel without picking ports.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `thaw` binary under test: `$THAW_BIN`, or the one beside this test's `deps/`.
pub fn thaw_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("THAW_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the running test's path");
    let dir = exe.parent().expect("a test binary lives in a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("deps/ has a parent")
    } else {
        dir
    };
    dir.join("thaw")
}

/// Runs `thaw ARGS` and returns its output.
pub fn thaw(args: &[&str]) -> Output {
    Command::new(thaw_bin())
        .args(args)
        .output()
        .expect("run thaw")
}

/// Waits for `child` at most `limit`; kills it and fails if it takes longer.
pub fn finish_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("poll a child").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait for a child")
}

/// Starts `thaw ARGS` as a child with its output captured.
pub fn spawn_thaw(args: &[impl AsRef<OsStr>]) -> Child {
    Command::new(thaw_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run thaw")
}

/// Polls until the directory store at `store` holds at least `n` chunk files
/// (staged uploads included), or `child` exits first (its status); fails the
/// test after 60 s.
pub fn wait_for_chunks(
    store: &Path,
    n: usize,
    child: &mut Child,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("poll a child") {
            return Some(status);
        }
        let count = std::fs::read_dir(store.join("chunks"))
            .map(|dirs| {
                dirs.map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
                    .sum::<usize>()
            })
            .unwrap_or(0);
        if count >= n {
            return None;
        }
        assert!(Instant::now() < deadline, "no chunks arrived in 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `thaw ARGS` with its output captured, failing the test if it runs
/// longer than `limit`.
pub fn thaw_within(args: &[impl AsRef<OsStr>], limit: Duration) -> Output {
    let child = spawn_thaw(args);
    let what = args.iter().map(|a| a.as_ref().to_string_lossy());
    finish_within(
        child,
        limit,
        &format!("thaw {:?}", what.collect::<Vec<_>>()),
    )
}

/// Runs `thaw ARGS`, asserts success, and returns stdout.
pub fn thaw_ok(args: &[&str]) -> String {
    thaw_ok_env(args, &[])
}

/// [`thaw_ok`] with `envs` added to the environment.
pub fn thaw_ok_env(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(thaw_bin())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run thaw");
    assert!(
        out.status.success(),
        "thaw {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("thaw prints UTF-8")
}

/// Runs `thaw ARGS --json` and parses the JSON it prints.
pub fn thaw_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&thaw_ok(&a)).expect("thaw printed JSON")
}

/// A `thaw mount` in the background; unmounted (`thaw umount`) on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// `thaw mount REFERENCE DIR EXTRA...`; returns once the mount answers.
    pub fn new(reference: &str, dir: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).expect("create the mountpoint");
        let mut args = vec!["mount", reference, dir.to_str().expect("UTF-8 path")];
        args.extend_from_slice(extra);
        thaw_ok(&args);
        Mount {
            dir: dir.to_path_buf(),
        }
    }

    /// `thaw stats --json` of the mount.
    pub fn stats(&self) -> serde_json::Value {
        thaw_json(&["stats", self.dir.to_str().expect("UTF-8 path")])
    }

    /// Chunks the mount fetched over the network so far.
    pub fn fetched(&self) -> u64 {
        self.stats()["chunks_fetched"]
            .as_u64()
            .expect("a chunk count")
    }
}

/// Asserts that reading `buf.len()` bytes of `f` at `offset` fails with
/// `EIO` within `limit` (a mount's answer when its chunks cannot be had).
pub fn assert_eio_within(f: &std::fs::File, offset: u64, buf: &mut [u8], limit: Duration) {
    let t = Instant::now();
    let err = f.read_exact_at(buf, offset).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() < limit, "took {:?}", t.elapsed());
}

impl Drop for Mount {
    fn drop(&mut self) {
        let out = thaw(&["umount", self.dir.to_str().expect("UTF-8 path")]);
        if !out.status.success() {
            eprintln!("umount: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A `thaw serve` child process (over a `file://` store unless started
/// with [`Server::start_url`]); killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub store: PathBuf,
    bin: PathBuf,
    extra: Vec<String>,
    store_url: String,
    envs: Vec<(String, String)>,
}

impl Server {
    pub fn start(store: &Path) -> Server {
        Server::start_with(store, &[])
    }

    /// Starts a server over `store` (a directory) with extra `thaw serve` arguments.
    pub fn start_with(store: &Path, extra: &[&str]) -> Server {
        Server::start_bin(&thaw_bin(), store, extra)
    }

    /// Starts `bin serve` over `store` with extra arguments.
    pub fn start_bin(bin: &Path, store: &Path, extra: &[&str]) -> Server {
        let url = format!("file://{}", store.display());
        Server::start_full(bin, store, &url, &[], extra)
    }

    /// Starts a server over the store at `url` with `envs` added to its
    /// environment (an S3 store's `AWS_*` settings) and extra arguments.
    pub fn start_url(url: &str, envs: &[(String, String)], extra: &[&str]) -> Server {
        Server::start_full(&thaw_bin(), Path::new(""), url, envs, extra)
    }

    fn start_full(
        bin: &Path,
        store: &Path,
        url: &str,
        envs: &[(String, String)],
        extra: &[&str],
    ) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn(bin, url, envs, "127.0.0.1:0", &extra);
        Server {
            child: Some(child),
            port,
            store: store.to_path_buf(),
            bin: bin.to_path_buf(),
            extra,
            store_url: url.to_owned(),
            envs: envs.to_vec(),
        }
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// An image reference on this server.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{}", self.addr(), name_tag)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listen = format!("127.0.0.1:{}", self.port);
            let (mut child, _) =
                spawn(&self.bin, &self.store_url, &self.envs, &listen, &self.extra);
            std::thread::sleep(Duration::from_millis(100));
            if child.try_wait().expect("poll thaw serve").is_none() {
                self.child = Some(child);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not restart on port {}",
                self.port
            );
        }
    }

    /// The value of a Prometheus counter at `/metrics` (summed over labels).
    pub fn metric(&self, name: &str) -> f64 {
        let body = reqwest::blocking::get(format!("{}/metrics", self.url()))
            .and_then(|r| r.text())
            .expect("GET /metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM and waits for a graceful exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait for thaw serve")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `BIN serve` and reads the port from its first line.
fn spawn(
    bin: &Path,
    store_url: &str,
    envs: &[(String, String)],
    listen: &str,
    extra: &[String],
) -> (Child, u16) {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", listen, "--store", store_url])
        .args(extra)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} serve: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the first line of thaw serve");
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line from thaw serve: {line:?}"));
    (child, port)
}
