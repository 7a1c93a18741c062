//! The client against an in-process server on a unix socket that answers as
//! Cloud Hypervisor does (204 for actions, JSON for `vmm.ping`, 4xx with a
//! message for refusals) and records every request.

use super::*;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

/// (method, path, JSON body) of each request, in order.
type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Serves `answers` (status, body) to successive connections.
fn fake_ch(dir: &Path, answers: Vec<(u16, &'static str)>) -> (PathBuf, Seen) {
    let socket = dir.join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        // Like Cloud Hypervisor, answer 204 without a length and keep the
        // connection open: the client must not wait for a body.
        let mut open = Vec::new();
        for (status, body) in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            );
            let mut length = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut buf = vec![0; length];
            r.read_exact(&mut buf).unwrap();
            let json = if buf.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&buf).unwrap()
            };
            log.lock().unwrap().push((method, path, json));
            let reason = if status < 300 { "OK" } else { "Bad Request" };
            let reply = match status {
                204 => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
                _ => format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            };
            (&stream).write_all(reply.as_bytes()).unwrap();
            open.push(stream);
        }
    });
    (socket, seen)
}

fn config() -> ChVmConfig {
    ChVmConfig {
        cpus: 2,
        memory_bytes: 512 << 20,
        kernel: "/k/vmlinux".into(),
        initramfs: Some("/k/initrd".into()),
        cmdline: "console=ttyS0".into(),
        fs: vec![("env".into(), "/run/env.sock".into())],
        serial_socket: Some("/run/serial.sock".into()),
    }
}

#[test]
fn boot_snapshot_and_lazy_restore_send_the_documented_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, seen) = fake_ch(
        dir.path(),
        vec![
            (
                200,
                r#"{"build_version":"v53.0","version":"53.0","pid":7,"features":[]}"#,
            ),
            (204, ""),
            (204, ""),
            (204, ""),
            (204, ""),
            (204, ""),
        ],
    );
    let ch = ChClient::new(&socket);
    assert_eq!(ch.ping().unwrap()["version"], "53.0");
    ch.create(&config()).unwrap();
    ch.boot().unwrap();
    ch.pause().unwrap();
    ch.snapshot(Path::new("/snap/a")).unwrap();
    ch.restore(Path::new("/mnt/snap"), RestoreMode::OnDemand, true)
        .unwrap();
    let seen = seen.lock().unwrap();
    let calls: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert_eq!(
        calls,
        [
            "GET /api/v1/vmm.ping",
            "PUT /api/v1/vm.create",
            "PUT /api/v1/vm.boot",
            "PUT /api/v1/vm.pause",
            "PUT /api/v1/vm.snapshot",
            "PUT /api/v1/vm.restore",
        ]
    );
    let create = &seen[1].2;
    assert_eq!(create["memory"]["shared"], true);
    assert_eq!(create["memory"]["size"], 512u64 << 20);
    assert_eq!(create["cpus"]["boot_vcpus"], 2);
    assert_eq!(create["payload"]["initramfs"], "/k/initrd");
    assert_eq!(create["fs"][0]["socket"], "/run/env.sock");
    assert_eq!(create["serial"]["mode"], "Socket");
    assert_eq!(seen[4].2["destination_url"], "file:///snap/a");
    assert_eq!(
        seen[5].2,
        json!({ "source_url": "file:///mnt/snap", "memory_restore_mode": "OnDemand", "resume": true })
    );
}

#[test]
fn a_refusal_carries_the_vmm_s_message() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, _) = fake_ch(
        dir.path(),
        vec![(400, "Error restoring VM: prefault and ondemand")],
    );
    let err = ChClient::new(&socket)
        .restore(Path::new("/s"), RestoreMode::OnDemand, false)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("vm.restore") && text.contains("400") && text.contains("prefault"),
        "{text}"
    );
}

#[test]
fn vhost_user_devices_keep_the_restore_on_copy() {
    let dir = tempfile::tempdir().unwrap();
    let write =
        |config: Value| std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    write(json!({ "memory": { "size": 1 }, "disks": [{ "path": "/d" }] }));
    assert_eq!(restore_mode(dir.path()).unwrap(), RestoreMode::OnDemand);
    write(json!({ "fs": [{ "tag": "env", "socket": "/s" }] }));
    assert_eq!(restore_mode(dir.path()).unwrap(), RestoreMode::Copy);
    write(json!({ "net": [{ "vhost_user": true }] }));
    assert_eq!(restore_mode(dir.path()).unwrap(), RestoreMode::Copy);
}

#[test]
fn a_vm_directory_boots_snapshots_into_its_image_and_restores_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm");
    let spec = VmSpec::qemu("tcg", 256, 1, "console=ttyS0", true).for_cloud_hypervisor();
    let image = image_dir(&vm);
    std::fs::create_dir_all(&image).unwrap();
    // What Cloud Hypervisor's snapshot writes, without a vhost-user device.
    std::fs::write(image.join("config.json"), r#"{"memory":{"shared":true}}"#).unwrap();
    let (socket, seen) = fake_ch(dir.path(), vec![(204, ""); 5]);
    let ch = ChClient::new(&socket);
    boot(&ch, &CloudHypervisor::config(&vm, &spec)).unwrap();
    snapshot_into(&ch, &image).unwrap();
    restore_from(&ch, &image, true).unwrap();
    let seen = seen.lock().unwrap();
    let calls: Vec<&str> = seen.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        calls,
        [
            "/api/v1/vm.create",
            "/api/v1/vm.boot",
            "/api/v1/vm.pause",
            "/api/v1/vm.snapshot",
            "/api/v1/vm.restore",
        ]
    );
    let create = &seen[0].2;
    assert_eq!(create["payload"]["kernel"], json!(image.join("kernel")));
    assert_eq!(create["payload"]["initramfs"], json!(image.join("initrd")));
    assert_eq!(create["memory"]["size"], 256u64 << 20);
    assert_eq!(create["serial"]["socket"], json!(vm.join("console.sock")));
    let url = format!("file://{}", image.display());
    assert_eq!(seen[3].2["destination_url"], json!(url));
    assert_eq!(
        seen[4].2,
        json!({ "source_url": url, "memory_restore_mode": "OnDemand", "resume": false }),
        "a paused restore, memory on demand"
    );
}
