//! The `fuse-backend-rs` adapter: the FUSE operations a guest sends over
//! virtio-fs, translated into [`ImageFs`] calls. As on the host's FUSE door,
//! what is allowed, how long the guest may cache it and each error's errno are
//! the core's decisions. The one thing added here is the handle table
//! ([`Handles`]), which a snapshot carries to the next backend.
//!
//! Requests arrive on the blocking pool (see [`crate::backend`]), so a read
//! may wait for its chunks here without holding up its queue.

use crate::handles::Handles;
use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions, OpenOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use libc::{stat64, statvfs64};
use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use thaw_client::image::fs::{Attr, FsError, ImageFs, NEGATIVE_TTL, TTL};
use thaw_format::device_state::HandleKind;

/// An image served to a guest.
pub struct ImageFileSystem {
    pub(crate) fs: Arc<ImageFs>,
    pub(crate) handles: Handles,
    rt: tokio::runtime::Handle,
}

impl ImageFileSystem {
    pub fn new(fs: Arc<ImageFs>, rt: tokio::runtime::Handle) -> ImageFileSystem {
        ImageFileSystem {
            fs,
            handles: Handles::new(),
            rt,
        }
    }
}

fn err(e: FsError) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn stat(a: &Attr) -> stat64 {
    // SAFETY: stat64 is plain old data; all zeroes is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = a.ino;
    st.st_mode = a.mode;
    st.st_nlink = a.nlink.into();
    st.st_uid = a.uid;
    st.st_gid = a.gid;
    st.st_rdev = a.rdev;
    st.st_size = a.size as i64;
    st.st_blocks = a.blocks as i64;
    st.st_blksize = 128 << 10;
    let (secs, nanos) = (
        a.mtime_ns.div_euclid(1_000_000_000),
        a.mtime_ns.rem_euclid(1_000_000_000),
    );
    st.st_mtime = secs;
    st.st_mtime_nsec = nanos;
    st.st_atime = secs;
    st.st_atime_nsec = nanos;
    st.st_ctime = secs;
    st.st_ctime_nsec = nanos;
    st
}

fn entry(a: &Attr) -> Entry {
    Entry {
        inode: a.ino,
        generation: 0,
        attr: stat(a),
        attr_flags: 0,
        attr_timeout: TTL,
        entry_timeout: TTL,
    }
}

fn dirent<'a>(e: &thaw_client::image::fs::DirEntry<'a>) -> DirEntry<'a> {
    DirEntry {
        ino: e.ino,
        offset: e.next_offset as u64,
        // The directory entry type (`DT_*`) is the `st_mode` type's bits.
        type_: (e.mode & libc::S_IFMT) >> 12,
        name: e.name,
    }
}

impl ImageFileSystem {
    fn refuse<T>(&self) -> io::Result<T> {
        match self.fs.modify() {
            Ok(()) => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
            Err(e) => Err(err(e)),
        }
    }

    fn list(
        &self,
        ino: u64,
        handle: u64,
        offset: u64,
        mut add: impl FnMut(&thaw_client::image::fs::DirEntry<'_>) -> io::Result<usize>,
    ) -> io::Result<()> {
        if !self.handles.check(handle, ino, HandleKind::Dir) {
            return Err(ebadf());
        }
        let offset =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        for e in self.fs.readdir(ino, offset).map_err(err)? {
            if add(&e)? == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl FileSystem for ImageFileSystem {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(capable
            & (FsOptions::ASYNC_READ
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::DO_READDIRPLUS
                | FsOptions::READDIRPLUS_AUTO
                | FsOptions::CACHE_SYMLINKS
                | FsOptions::MAX_PAGES))
    }

    fn lookup(&self, _: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        match self.fs.lookup(parent, name.to_bytes()) {
            Ok(a) => Ok(entry(&a)),
            // Inode 0 is a negative entry, which the guest keeps for the
            // core's NEGATIVE_TTL.
            Err(FsError::NotFound) => Ok(Entry {
                inode: 0,
                generation: 0,
                // SAFETY: stat64 is plain old data; all zeroes is a valid value.
                attr: unsafe { std::mem::zeroed() },
                attr_flags: 0,
                attr_timeout: NEGATIVE_TTL,
                entry_timeout: NEGATIVE_TTL,
            }),
            Err(e) => Err(err(e)),
        }
    }

    fn getattr(&self, _: &Context, ino: u64, _: Option<u64>) -> io::Result<(stat64, Duration)> {
        let a = self.fs.getattr(ino).map_err(err)?;
        Ok((stat(&a), TTL))
    }

    fn readlink(&self, _: &Context, ino: u64) -> io::Result<Vec<u8>> {
        self.fs.readlink(ino).map(<[u8]>::to_vec).map_err(err)
    }

    fn open(
        &self,
        _: &Context,
        ino: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let opened = self.fs.open(ino, flags as i32).map_err(err)?;
        let handle = self.handles.open(ino, HandleKind::File);
        let opts = if opened.keep_cache {
            OpenOptions::KEEP_CACHE
        } else {
            OpenOptions::empty()
        };
        Ok((Some(handle), opts, None))
    }

    fn read(
        &self,
        _: &Context,
        ino: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        if !self.handles.check(handle, ino, HandleKind::File) {
            return Err(ebadf());
        }
        let data = self
            .rt
            .block_on(self.fs.read(ino, offset, size))
            .map_err(|e| {
                tracing::warn!(ino, offset, size, "read failed: {e}");
                err(e)
            })?;
        w.write_all(&data)?;
        Ok(data.len())
    }

    fn release(
        &self,
        _: &Context,
        _ino: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles.release(handle);
        Ok(())
    }

    fn flush(&self, _: &Context, _: u64, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }

    fn opendir(
        &self,
        _: &Context,
        ino: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.fs.readdir(ino, i64::MAX).map_err(err)?;
        Ok((
            Some(self.handles.open(ino, HandleKind::Dir)),
            OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR,
        ))
    }

    fn readdir(
        &self,
        _: &Context,
        ino: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list(ino, handle, offset, |e| add_entry(dirent(e)))
    }

    fn readdirplus(
        &self,
        _: &Context,
        ino: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list(ino, handle, offset, |e| {
            let a = self.fs.getattr(e.ino).map_err(err)?;
            add_entry(dirent(e), entry(&a))
        })
    }

    fn releasedir(&self, _: &Context, _ino: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.handles.release(handle);
        Ok(())
    }

    fn statfs(&self, _: &Context, _: u64) -> io::Result<statvfs64> {
        let s = self.fs.statfs();
        // SAFETY: statvfs64 is plain old data; all zeroes is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = s.block_size.into();
        st.f_frsize = s.block_size.into();
        st.f_blocks = s.blocks;
        st.f_files = s.files;
        st.f_namemax = s.max_name.into();
        st.f_flag = libc::ST_RDONLY;
        Ok(st)
    }

    fn getxattr(&self, _: &Context, ino: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        let v = self.fs.getxattr(ino, name.to_bytes()).map_err(err)?;
        xattr_reply(v, size).map(|v| match v {
            XattrAnswer::Count(n) => GetxattrReply::Count(n),
            XattrAnswer::Value(v) => GetxattrReply::Value(v),
        })
    }

    fn listxattr(&self, _: &Context, ino: u64, size: u32) -> io::Result<ListxattrReply> {
        let v = self.fs.listxattr(ino).map_err(err)?;
        xattr_reply(&v, size).map(|v| match v {
            XattrAnswer::Count(n) => ListxattrReply::Count(n),
            XattrAnswer::Value(v) => ListxattrReply::Names(v),
        })
    }

    fn access(&self, _: &Context, ino: u64, mask: u32) -> io::Result<()> {
        self.fs.access(ino, mask as i32).map_err(err)
    }

    // Everything below would change the image: the core refuses it.

    fn setattr(
        &self,
        _: &Context,
        _: u64,
        _: stat64,
        _: Option<u64>,
        _: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.refuse()
    }

    fn symlink(&self, _: &Context, _: &CStr, _: u64, _: &CStr) -> io::Result<Entry> {
        self.refuse()
    }

    fn mknod(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32, _: u32) -> io::Result<Entry> {
        self.refuse()
    }

    fn mkdir(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32) -> io::Result<Entry> {
        self.refuse()
    }

    fn unlink(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        self.refuse()
    }

    fn rmdir(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        self.refuse()
    }

    fn rename(&self, _: &Context, _: u64, _: &CStr, _: u64, _: &CStr, _: u32) -> io::Result<()> {
        self.refuse()
    }

    fn link(&self, _: &Context, _: u64, _: u64, _: &CStr) -> io::Result<Entry> {
        self.refuse()
    }

    fn create(
        &self,
        _: &Context,
        _: u64,
        _: &CStr,
        _: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.refuse()
    }

    fn write(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: &mut dyn ZeroCopyReader,
        _: u32,
        _: u64,
        _: Option<u64>,
        _: bool,
        _: u32,
        _: u32,
    ) -> io::Result<usize> {
        self.refuse()
    }

    fn fallocate(&self, _: &Context, _: u64, _: u64, _: u32, _: u64, _: u64) -> io::Result<()> {
        self.refuse()
    }

    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        self.refuse()
    }

    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        self.refuse()
    }
}

/// An xattr answer: its size when asked with size 0, else the value if it fits.
enum XattrAnswer {
    Count(u32),
    Value(Vec<u8>),
}

fn xattr_reply(v: &[u8], size: u32) -> io::Result<XattrAnswer> {
    if size == 0 {
        Ok(XattrAnswer::Count(v.len() as u32))
    } else if (size as usize) < v.len() {
        Err(io::Error::from_raw_os_error(libc::ERANGE))
    } else {
        Ok(XattrAnswer::Value(v.to_vec()))
    }
}
