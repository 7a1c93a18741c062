//! A mount's lifecycle: mount, answer on the control socket, serve until a
//! signal or an unmount from elsewhere, then clean up (flush the disk cache
//! writes, remove the control socket if it is still ours).

use crate::adapter::FuseAdapter;
use crate::options::{FuseError, FuseOptions};
use crate::push::Pusher;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use thaw_client::image::control::ControlSocket;
use thaw_client::image::Image;

/// A mounted image. Dropping it unmounts.
pub struct Session {
    fuse: fuser::BackgroundSession,
    image: Arc<Image>,
    _control: ControlSocket,
    mountpoint: PathBuf,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The shutdown future resolved (a signal): the session unmounted.
    Shutdown,
    /// Someone else unmounted (`thaw umount`, `fusermount3 -u`).
    UnmountedElsewhere,
}

impl Session {
    /// Mounts `image` at `mountpoint` and returns once the mount answers.
    pub fn mount(
        image: Arc<Image>,
        mountpoint: &Path,
        opts: &FuseOptions,
        rt: tokio::runtime::Handle,
    ) -> Result<Session, FuseError> {
        recover_stale(mountpoint);
        let started = Instant::now();
        let pusher = Arc::new(OnceLock::new());
        let adapter = FuseAdapter {
            fs: image.fs.clone(),
            rt,
            zero_message_open: false,
            zero_message_opendir: false,
            pusher: pusher.clone(),
        };
        let mount_error = |source| FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        };
        let session =
            fuser::Session::new(adapter, mountpoint, &opts.mount_options(&image.reference))
                .map_err(mount_error)?;
        // A recording for the server sees every read (a local recording
        // counts what was pushed).
        if opts.push && !image.recording_for_server() {
            // Set before the session serves its first request.
            match session
                .as_fd()
                .try_clone_to_owned()
                .and_then(|dev| Pusher::start(image.fs.clone(), dev))
            {
                Ok(p) => {
                    let _ = pusher.set(p);
                }
                Err(e) => tracing::warn!("page cache push off: {e}"),
            }
        }
        let fuse = session.spawn().map_err(mount_error)?;
        // The mount answers once a getattr through it succeeds.
        std::fs::metadata(mountpoint).map_err(|source| FuseError::NotAnswering {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
        tracing::info!(ms = started.elapsed().as_secs_f64() * 1000.0, "mounted");
        if opts.kernel_readahead > 0 {
            crate::kernel::set_readahead(mountpoint, opts.kernel_readahead);
        }
        let control = serve_control(&image, mountpoint)?;
        Ok(Session {
            fuse,
            image,
            _control: control,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Serves until `shutdown` resolves or the mount goes away, then cleans up.
    pub fn run_until(
        self,
        rt: &tokio::runtime::Handle,
        shutdown: impl Future<Output = ()>,
    ) -> Ended {
        let ended = rt.block_on(async {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => return Ended::Shutdown,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if self.fuse.guard.is_finished() {
                            return Ended::UnmountedElsewhere;
                        }
                    }
                }
            }
        });
        self.close(ended);
        ended
    }

    /// Unmounts now, then waits for the fetches and cache writes in flight.
    pub fn unmount(self) {
        self.close(Ended::Shutdown);
    }

    /// Unmounts (unless already unmounted elsewhere) and waits for the
    /// fetches and cache writes in flight, so a remount finds them.
    fn close(self, ended: Ended) {
        let Session {
            fuse,
            image,
            _control,
            ..
        } = self;
        if ended == Ended::UnmountedElsewhere {
            // Dropping the session would unmount again, and could hit a newer
            // mount at the same path.
            std::mem::forget(fuse);
        } else {
            drop(fuse);
        }
        image.fs.flush();
    }
}

fn serve_control(image: &Arc<Image>, mountpoint: &Path) -> Result<ControlSocket, FuseError> {
    ControlSocket::for_image(image, mountpoint, "fuse").map_err(|source| FuseError::Control {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })
}

/// A mount whose process died leaves its mountpoint answering ENOTCONN;
/// detach it so a new mount can take its place.
fn recover_stale(mountpoint: &Path) {
    // Listing asks the kernel's FUSE connection (a stat may be answered
    // from cached attributes).
    let stale =
        std::fs::read_dir(mountpoint).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
    if stale {
        tracing::warn!(mountpoint = %mountpoint.display(), "detaching the stale mount of a process that died");
        let _ = crate::kernel::detach(mountpoint);
    }
}
