//! thaw's virtio-fs door: a vhost-user-fs backend that serves the lazy image
//! core to a VM guest, which mounts it with `mount -t virtiofs TAG /dir` and
//! needs neither a FUSE daemon nor a network inside.
//!
//! It is built from the rust-vmm crates, as nydus and virtiofsd are:
//! `vhost-user-backend` speaks the vhost-user protocol with the VMM (Cloud
//! Hypervisor, QEMU, Kata's), `virtio-queue` and `vm-memory` walk the queues
//! in guest memory, and `fuse-backend-rs` decodes the FUSE messages in each
//! descriptor chain. [`filesystem`] translates them into the image core's
//! calls; [`backend`] runs the queues and hands over the device state when
//! the VM is snapshotted. Everything about the image (verification, caches,
//! readahead, prefetch, failure behaviour, counters) is the core's, shared
//! with host mounts.
//!
//! Host mounts keep `fuser`: `fuse-backend-rs` could serve `/dev/fuse` too,
//! but its FUSE-device path offers nothing `fuser` lacks for thaw, and the
//! core's single-errno-mapping seam makes each door a few hundred lines.

mod backend;
pub mod filesystem;
mod handles;

pub use backend::FsBackend;
pub use filesystem::ImageFileSystem;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thaw_client::image::control::ControlSocket;
use thaw_client::image::Image;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// How to serve.
#[derive(Debug, Clone)]
pub struct VirtiofsOptions {
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// Request queues offered to the guest (besides the high-priority one).
    pub request_queues: usize,
    /// Largest queue size the guest may set.
    pub queue_size: usize,
    /// How long a snapshot waits for requests in flight before it is refused.
    pub drain_timeout: Duration,
}

impl VirtiofsOptions {
    pub fn new(socket: impl Into<PathBuf>) -> VirtiofsOptions {
        VirtiofsOptions {
            socket: socket.into(),
            request_queues: 2,
            queue_size: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsError {
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot set up the vhost-user device: {0}")]
    Device(String),
    #[error("vhost-user connection failed: {0}")]
    Serve(String),
    #[error("cannot serve the control socket for {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The VMM disconnected (the VM stopped, or was migrated away).
    Disconnected,
    /// The shutdown future resolved (a signal).
    Shutdown,
}

/// Serves `image` to one VMM on `opts.socket`: listens, calls `ready` (the
/// socket accepts from then on), and serves until the VMM disconnects or
/// `shutdown` resolves; then waits for fetches and cache writes in flight.
pub fn serve(
    image: Arc<Image>,
    opts: &VirtiofsOptions,
    rt: &tokio::runtime::Handle,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, VirtiofsError> {
    let fs = Arc::new(ImageFileSystem::new(image.fs.clone(), rt.clone()));
    let backend = Arc::new(FsBackend::new(
        fs,
        image.manifest,
        rt.clone(),
        opts.request_queues,
        opts.queue_size,
        opts.drain_timeout,
    ));
    let mut listener =
        Listener::new(&opts.socket, true).map_err(|source| VirtiofsError::Listen {
            path: opts.socket.clone(),
            source,
        })?;
    let _control = serve_control(&image, &opts.socket)?;
    let mut daemon = VhostUserDaemon::new(
        "thaw-virtiofs".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VirtiofsError::Device(e.to_string()))?;
    ready();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let result = daemon.start(&mut listener).and_then(|()| daemon.wait());
            let _ = done_tx.send(result.or_else(|e| if hung_up(&e) { Ok(()) } else { Err(e) }));
        })
        .expect("spawn the vhost-user thread");
    let ended = rt.block_on(async {
        tokio::select! {
            result = done_rx => match result {
                Ok(Ok(())) => Ok(Ended::Disconnected),
                Ok(Err(e)) => Err(VirtiofsError::Serve(e.to_string())),
                Err(_) => Ok(Ended::Disconnected),
            },
            () = shutdown => Ok(Ended::Shutdown),
        }
    });
    image.fs.flush();
    let _ = std::fs::remove_file(&opts.socket);
    ended
}

/// Whether `e` is the VMM closing its end, the normal end of a connection.
fn hung_up(e: &vhost_user_backend::Error) -> bool {
    use vhost::vhost_user::Error as E;
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            E::Disconnected | E::PartialMessage | E::SocketBroken(_)
        )
    )
}

fn serve_control(image: &Arc<Image>, socket: &Path) -> Result<ControlSocket, VirtiofsError> {
    ControlSocket::for_image(image, socket, "virtiofs").map_err(|source| VirtiofsError::Control {
        path: socket.to_path_buf(),
        source,
    })
}
