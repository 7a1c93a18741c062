//! The initramfs a guest boots into: a newc cpio archive, written here.
//!
//! newc is the format the kernel unpacks (`Documentation/driver-api/
//! early-userspace/buffer-format.rst`): per entry a 110-byte ASCII header of
//! hex fields, the NUL-terminated name and the data, each padded to 4 bytes,
//! then a `TRAILER!!!` entry. Uncompressed, since the kernel takes it as is.
//! Every timestamp and owner is zero, so the same guest builds the same bytes
//! (a restore boots QEMU with the initramfs the saved guest had).

use super::modules::{self, Module};
use super::{GuestConfig, GuestError, GuestKit};
use std::collections::BTreeMap;
use std::process::Command;

/// The line `/init` prints before the caller's script runs.
pub const SCRIPT_BEGIN: &str = "==== thaw-guest: script begin ====";
/// The line `/init` prints after it, with the script's exit status:
/// `==== thaw-guest: script end, status 0 ====`.
pub const SCRIPT_END: &str = "==== thaw-guest: script end, status ";
/// What `/init` prints (then powers off) when it cannot set the guest up.
pub const INIT_FAILED: &str = "thaw-guest init failed: ";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// A tree of files to pack as an initramfs; parents are added as needed.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    /// By path without a leading `/`: sorted, so parents come first.
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    /// Everything a guest of `config` needs: busybox, the modules, `/init`,
    /// the script and the caller's files.
    pub fn for_guest(kit: &GuestKit, config: &GuestConfig) -> Result<Initramfs, GuestError> {
        let mut fs = Initramfs::new();
        for dir in ["dev", "proc", "sys", "tmp", "mnt", "root"] {
            fs.dir(dir, 0o755);
        }
        fs.char_device("dev/console", 0o600, 5, 1);

        let busybox = std::fs::read(&kit.busybox)
            .map_err(GuestError::io(format!("read {}", kit.busybox.display())))?;
        fs.file("bin/busybox", busybox, 0o755);
        for applet in busybox_applets(kit)? {
            if applet != "bin/busybox" {
                fs.symlink(&applet, "/bin/busybox");
            }
        }

        let modules = modules::resolve(&kit.modules, &config.modules())?;
        for m in &modules {
            fs.file(
                &format!("lib/modules/{}.ko", m.name),
                m.bytes.clone(),
                0o644,
            );
        }
        fs.file("init", init_script(config, &modules).into_bytes(), 0o755);
        fs.file("script", config.script.clone().into_bytes(), 0o755);
        for f in &config.files {
            fs.file(&f.path, f.bytes.clone(), f.mode);
        }
        Ok(fs)
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Entry::Dir { mode });
    }

    pub fn file(&mut self, path: &str, bytes: Vec<u8>, mode: u32) {
        self.insert(path, Entry::File { mode, bytes });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let target = target.to_string();
        self.insert(path, Entry::Symlink { target });
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.insert(path, Entry::CharDevice { mode, major, minor });
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_matches('/').to_string();
        assert!(!path.is_empty(), "an initramfs entry needs a name");
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.entries
                .entry(p.to_string())
                .or_insert(Entry::Dir { mode: 0o755 });
            parent = p;
        }
        self.entries.insert(path, entry);
    }

    /// The archive, in newc format.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (S_IFDIR | mode, 2, &[], (0, 0)),
                Entry::File { mode, bytes } => (S_IFREG | mode, 1, bytes, (0, 0)),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Entry::CharDevice { mode, major, minor } => {
                    (S_IFCHR | mode, 1, &[], (*major, *minor))
                }
            };
            write_entry(&mut out, ino, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(data.len()).expect("an initramfs file under 4 GiB"),
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (only for the crc format)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The applet paths (`bin/sh`, `sbin/poweroff`, ...) of the kit's busybox.
fn busybox_applets(kit: &GuestKit) -> Result<Vec<String>, GuestError> {
    let what = format!("{} --list-full", kit.busybox.display());
    let out = Command::new(&kit.busybox)
        .arg("--list-full")
        .output()
        .map_err(GuestError::io(what.clone()))?;
    if !out.status.success() {
        let source = std::io::Error::other(format!("exit {}", out.status));
        return Err(GuestError::Io { what, source });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// `/init`: mount the kernel filesystems, load the modules, mount virtio-fs,
/// run the script between the markers, power off.
fn init_script(config: &GuestConfig, modules: &[Module]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # The init of a thaw test guest, generated by thaw_testkit::guest.\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root\n",
    );
    s += &format!("fail() {{ echo \"{INIT_FAILED}$*\"; poweroff -f; }}\n");
    s += "mount -t proc proc /proc || fail 'mount /proc'\n\
          mount -t sysfs sysfs /sys || fail 'mount /sys'\n\
          mount -t devtmpfs devtmpfs /dev || fail 'mount /dev'\n\
          # Kernel messages would interleave with the script's output.\n\
          dmesg -n 1\n\
          # Lines written to the console are input, not output.\n\
          stty -echo 2>/dev/null\n";
    for m in modules {
        s += &format!("insmod /lib/modules/{0}.ko || fail 'insmod {0}'\n", m.name);
    }
    if let Some(fs) = &config.virtio_fs {
        let tag = sh_quote(&fs.tag);
        s += &format!("mount -t virtiofs {tag} /mnt || fail mount -t virtiofs {tag}\n");
    }
    s += &format!(
        "cd /\n\
         echo '{SCRIPT_BEGIN}'\n\
         sh /script\n\
         echo \"{SCRIPT_END}$? ====\"\n\
         sync\n\
         poweroff -f\n"
    );
    s
}

/// `s` as one shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_names_and_padding() {
        let mut fs = Initramfs::new();
        fs.file("a/b", b"hello".to_vec(), 0o644);
        let cpio = fs.to_cpio();
        // "a" (the parent, added first), "a/b", then the trailer.
        let header = |at: usize| {
            std::str::from_utf8(&cpio[at..at + 110])
                .unwrap()
                .to_string()
        };
        let first = header(0);
        assert!(first.starts_with("070701"));
        assert_eq!(&first[14..22], "000041ed", "a directory, 0755");
        assert_eq!(&first[94..102], "00000002", "name size with its NUL");
        assert_eq!(&cpio[110..112], b"a\0");
        let second_at = 112; // 110 + 2 is already a multiple of 4
        let second = header(second_at);
        assert_eq!(&second[14..22], "000081a4", "a regular file, 0644");
        assert_eq!(&second[54..62], "00000005", "file size");
        let name_at = second_at + 110;
        assert_eq!(&cpio[name_at..name_at + 4], b"a/b\0");
        let data_at = (name_at + 4).next_multiple_of(4);
        assert_eq!(&cpio[data_at..data_at + 5], b"hello");
        let trailer_at = (data_at + 5).next_multiple_of(4);
        assert_eq!(&cpio[trailer_at + 110..trailer_at + 121], b"TRAILER!!!\0");
        assert_eq!(cpio.len() % 4, 0);
    }

    #[test]
    fn the_same_tree_gives_the_same_bytes() {
        let build = || {
            let mut fs = Initramfs::new();
            fs.symlink("bin/sh", "/bin/busybox");
            fs.char_device("dev/console", 0o600, 5, 1);
            fs.file("init", b"#!/bin/sh\n".to_vec(), 0o755);
            fs.to_cpio()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn quotes_shell_words() {
        assert_eq!(sh_quote("thaw"), "'thaw'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
