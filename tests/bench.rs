//! A small `thaw bench` end to end: every mode runs on every built-in workload
//! and the startup reads find the bytes they expect (the reader checks each
//! read's BLAKE3, so a mismatch fails the run). Timing is not asserted.

use thaw_testkit::thaw_ok;

#[test]
fn bench_runs_every_mode_on_every_workload() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, out) = (tmp.path().join("work"), tmp.path().join("out"));
    let stdout = thaw_ok(&[
        "bench",
        "--scale",
        "0.01",
        "--runs",
        "1",
        "--link",
        "1gbit,1ms",
        "--work-dir",
        work.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let workloads = doc["workloads"].as_array().unwrap();
    let names: Vec<&str> = workloads
        .iter()
        .map(|w| w["workload"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["python-env", "weights", "both"]);
    for w in workloads {
        assert!(w["read_bytes"].as_u64().unwrap() > 0, "{w}");
        let modes = w["modes"].as_array().unwrap();
        for name in [
            "full pull",
            "lazy cold",
            "lazy profiled",
            "lazy warm",
            "local",
        ] {
            let m = modes
                .iter()
                .find(|m| m["mode"] == name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert!(m["skipped"].is_null(), "{name} skipped");
            assert_eq!(m["samples"].as_array().unwrap().len(), 1);
            assert!(m["median_seconds"].as_f64().unwrap() > 0.0);
        }
        let fetched = |n: &str| {
            modes.iter().find(|m| m["mode"] == n).unwrap()["median_bytes_fetched"]
                .as_u64()
                .unwrap()
        };
        // The full pull fetched the whole stored image; the warm mount nothing.
        assert_eq!(fetched("full pull"), w["stored_bytes"].as_u64().unwrap());
        assert!(fetched("lazy cold") > 0);
        assert!(fetched("lazy profiled") > 0);
        assert_eq!(fetched("lazy warm"), 0);
        for peer in ["casync", "nydus"] {
            let m = modes.iter().find(|m| m["mode"] == peer).unwrap();
            if let Some(why) = m["skipped"].as_str() {
                eprintln!("WARNING: peer {peer} was skipped: {why}");
            } else {
                assert_eq!(m["samples"].as_array().unwrap().len(), 1);
            }
        }
    }
    assert!(doc["ceilings"]["loopback_bytes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(out.join("startup.svg"))
        .unwrap()
        .starts_with("<svg"));
}

/// `--pip`: a real environment that the bench installs from PyPI itself
/// (a small package here), started by importing it from the image.
#[test]
fn bench_runs_on_a_pip_installed_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let (work, out, cache) = (
        tmp.path().join("work"),
        tmp.path().join("out"),
        tmp.path().join("cache"),
    );
    let stdout = thaw_testkit::process::thaw_ok_env(
        &[
            "bench",
            "--pip",
            "six",
            "--runs",
            "1",
            "--no-peers",
            "--work-dir",
            work.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[("XDG_CACHE_HOME", cache.to_str().unwrap())],
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let w = &doc["workloads"][0];
    assert!(
        w["read_bytes"].as_u64().unwrap() > 0,
        "the import read six: {w}"
    );
    let cold = w["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == "lazy cold")
        .unwrap();
    assert!(cold["median_bytes_fetched"].as_u64().unwrap() > 0, "{cold}");
    let installed = std::fs::read_dir(cache.join("thaw/bench-pip"))
        .unwrap()
        .count();
    assert_eq!(installed, 1, "one environment per package list");
}
