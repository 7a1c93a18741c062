//! The `fuser` adapter: translates kernel requests into [`ImageFs`] calls and
//! results into replies, and nothing more: what is allowed and how long the
//! kernel may cache it, and the errno of each error, are the core's decisions.
//! Metadata is answered inline (it never blocks); reads run as tasks on the
//! tokio runtime and reply when their chunks arrive, so the request loop
//! never waits on the network.

use crate::push::Pusher;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};
use thaw_client::image::fs::{Attr, FsError, ImageFs, NEGATIVE_TTL, TTL};

/// The core's errno for `e`.
pub(crate) fn errno(e: &FsError) -> i32 {
    e.errno()
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    let t = if a.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(a.mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(a.mtime_ns.unsigned_abs())
    };
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 128 << 10,
        flags: 0,
    }
}

/// The attributes of a negative entry: inode 0, nothing else read.
const NEGATIVE_ENTRY: FileAttr = FileAttr {
    ino: 0,
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// Serves an [`ImageFs`] to the kernel.
pub(crate) struct FuseAdapter {
    pub fs: Arc<ImageFs>,
    pub rt: tokio::runtime::Handle,
    /// Whether the kernel takes ENOSYS to a successful open (or opendir) as
    /// a zero-message open, as it says at init; older kernels fail it.
    pub zero_message_open: bool,
    pub zero_message_opendir: bool,
    /// Where regular files the kernel is given and forgets are told, when
    /// the mount pushes bytes in memory to the page cache.
    pub pusher: Arc<OnceLock<Pusher>>,
}

/// A reply that can carry an error.
trait ErrorReply {
    fn error(self, errno: i32);
}

macro_rules! error_reply {
    ($($t:ty),*) => { $(impl ErrorReply for $t { fn error(self, errno: i32) { <$t>::error(self, errno) } })* };
}
error_reply!(
    ReplyAttr,
    ReplyWrite,
    ReplyEntry,
    ReplyEmpty,
    fuser::ReplyCreate
);

impl FuseAdapter {
    /// The kernel now holds `a`'s inode once more, from a lookup
    /// (`looked_up`) or a listing.
    fn given(&self, a: &Attr, looked_up: bool) {
        if let Some(p) = self.pusher.get() {
            if a.mode & libc::S_IFMT == libc::S_IFREG && a.size > 0 {
                p.known(a.ino, looked_up);
            }
        }
    }

    /// Answers an operation that would change the image, as the core decides.
    fn refuse(&self, reply: impl ErrorReply) {
        match self.fs.modify() {
            Ok(()) => reply.error(libc::ENOSYS),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Operations that would change the image: the core answers them all.
macro_rules! modifying {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $reply:ty;)*) => {
        $(fn $name(&mut self, _req: &Request<'_>, $(_: $ty,)* reply: $reply) {
            self.refuse(reply);
        })*
    };
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        use fuser::consts::*;
        for cap in [
            FUSE_DO_READDIRPLUS,
            FUSE_CACHE_SYMLINKS,
            FUSE_PARALLEL_DIROPS,
            FUSE_SPLICE_WRITE,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // Flags the kernel offers rather than asks for: accepting one says
        // whether it was offered.
        self.zero_message_open = config.add_capabilities(FUSE_NO_OPEN_SUPPORT).is_ok();
        self.zero_message_opendir = config.add_capabilities(FUSE_NO_OPENDIR_SUPPORT).is_ok();
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(128);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent, name.as_bytes()) {
            Ok(a) => {
                reply.entry(&TTL, &to_fuse(&a), 0);
                self.given(&a, true);
            }
            // Inode 0 is a negative entry, which the kernel keeps for the
            // core's NEGATIVE_TTL.
            Err(FsError::NotFound) => reply.entry(&NEGATIVE_TTL, &NEGATIVE_ENTRY, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        if let Some(p) = self.pusher.get() {
            p.forgotten(ino, nlookup);
        }
    }

    fn batch_forget(&mut self, _req: &Request<'_>, nodes: &[fuser::fuse_forget_one]) {
        if let Some(p) = self.pusher.get() {
            for n in nodes {
                p.forgotten(n.nodeid, n.nlookup);
            }
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.fs.getattr(ino) {
            Ok(a) => reply.attr(&TTL, &to_fuse(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.fs.readlink(ino) {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match self.fs.open(ino, flags) {
            // ENOSYS to an open that succeeds is the kernel's zero-message
            // open: it stops sending opens and releases for this mount and
            // keeps each file's page cache, two round trips fewer per file.
            // (Opens for writing never get here: the mount is read-only.)
            Ok(o) if o.stateless && o.keep_cache && self.zero_message_open => {
                reply.error(libc::ENOSYS)
            }
            Ok(o) if o.keep_cache => reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE),
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        // As for files: a listing needs no handle, and without opendirs the
        // kernel also caches the listings themselves.
        match self.fs.getattr(ino) {
            Ok(_) if self.zero_message_opendir => reply.error(libc::ENOSYS),
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        let span = tracing::debug_span!("read", ino, offset, size);
        self.rt.spawn(async move {
            let _enter = span.enter();
            match fs.read(ino, offset.max(0) as u64, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(ino, offset, size, "read failed: {e}");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        e.ino,
                        e.next_offset,
                        file_type(e.mode),
                        OsStr::from_bytes(e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.fs.readdir(ino, offset) {
            Ok(entries) => {
                let mut given = Vec::new();
                for e in entries {
                    let Ok(a) = self.fs.getattr(e.ino) else {
                        continue;
                    };
                    if reply.add(
                        e.ino,
                        e.next_offset,
                        OsStr::from_bytes(e.name),
                        &TTL,
                        &to_fuse(&a),
                        0,
                    ) {
                        break;
                    }
                    // The kernel counts a lookup of each entry but `.` and `..`.
                    if e.name != b"." && e.name != b".." {
                        given.push(a);
                    }
                }
                reply.ok();
                for a in &given {
                    self.given(a, false);
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            0,
            0,
            s.files,
            0,
            s.block_size,
            s.max_name,
            s.block_size,
        );
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        match self.fs.getxattr(ino, name.as_bytes()) {
            Ok(v) => xattr_reply(v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        match self.fs.access(ino, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        self.refuse(reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.refuse(reply);
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        self.refuse(reply);
    }

    modifying! {
        mknod(parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32) -> ReplyEntry;
        mkdir(parent: u64, name: &OsStr, mode: u32, umask: u32) -> ReplyEntry;
        unlink(parent: u64, name: &OsStr) -> ReplyEmpty;
        rmdir(parent: u64, name: &OsStr) -> ReplyEmpty;
        symlink(parent: u64, name: &OsStr, link: &std::path::Path) -> ReplyEntry;
        rename(parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> ReplyEmpty;
        link(ino: u64, newparent: u64, newname: &OsStr) -> ReplyEntry;
        setxattr(ino: u64, name: &OsStr, value: &[u8], flags: i32, position: u32) -> ReplyEmpty;
        removexattr(ino: u64, name: &OsStr) -> ReplyEmpty;
    }
}

fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if (size as usize) < v.len() {
        reply.error(libc::ERANGE);
    } else {
        reply.data(v);
    }
}
