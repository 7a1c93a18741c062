//! The vhost-user device: queues, guest memory, and the state a snapshot
//! carries.
//!
//! Each queue has its own event thread (vhost-user-backend's epoll loop).
//! A kick pops every available request and hands each to the runtime's
//! blocking pool, where `fuse-backend-rs` decodes it and the
//! [`ImageFileSystem`] answers it; the request is returned to the guest
//! (`add_used`, then a notification unless EVENT_IDX says the guest does not
//! want one) when it is done, in whatever order requests finish. So a read
//! waiting for the network holds up neither its queue nor the others, and a
//! guest blocked on one page fault keeps running everything else.
//!
//! Guest memory carries vhost-user-backend's dirty bitmap, so the device
//! supports `VHOST_F_LOG_ALL`: writes into guest memory during a migration
//! are logged for the VMM. With `VHOST_USER_PROTOCOL_F_DEVICE_STATE` the VMM
//! asks for the device's state once its queues are stopped; this backend
//! waits for the requests it already took to finish (their replies are in
//! guest memory by then) and writes a [`DeviceState`]. On the restoring side a
//! fresh backend reads the state, refuses it unless it names the image being
//! served, and takes over the open handles.

use crate::filesystem::ImageFileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thaw_format::device_state::DeviceState;
use thaw_format::Digest;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Guest memory, with the dirty log a migration reads.
pub(crate) type Memory = GuestMemoryMmap<BitmapMmapRegion>;
type AtomicMemory = GuestMemoryAtomic<Memory>;
pub(crate) type Vring = VringRwLock<AtomicMemory>;

/// How a state transfer ended, read by `check_device_state`.
type Transfer = JoinHandle<Result<(), String>>;

/// The vhost-user-fs device serving one image.
pub struct FsBackend {
    server: Arc<Server<Arc<ImageFileSystem>>>,
    fs: Arc<ImageFileSystem>,
    manifest: Digest,
    rt: tokio::runtime::Handle,
    request_queues: usize,
    queue_size: usize,
    /// How long a state save waits for requests in flight.
    drain_timeout: Duration,
    event_idx: AtomicBool,
    mem: RwLock<Option<AtomicMemory>>,
    in_flight: Arc<InFlight>,
    transfer: Mutex<Option<Transfer>>,
}

impl FsBackend {
    pub fn new(
        fs: Arc<ImageFileSystem>,
        manifest: Digest,
        rt: tokio::runtime::Handle,
        request_queues: usize,
        queue_size: usize,
        drain_timeout: Duration,
    ) -> FsBackend {
        FsBackend {
            server: Arc::new(Server::new(fs.clone())),
            fs,
            manifest,
            rt,
            request_queues: request_queues.max(1),
            queue_size,
            drain_timeout,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            in_flight: Arc::new(InFlight::default()),
            transfer: Mutex::new(None),
        }
    }

    /// Pops every available request of `vring` and starts each.
    fn drain(&self, vring: &Vring, mem: &Arc<Memory>) {
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { return };
            self.start(chain, vring.clone());
        }
    }

    /// Answers one request on the blocking pool and returns it to the guest.
    fn start(&self, chain: DescriptorChain<Arc<Memory>>, vring: Vring) {
        let server = self.server.clone();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let guard = self.in_flight.enter();
        self.rt.spawn_blocking(move || {
            let head = chain.head_index();
            let mem = chain.memory();
            let answered = Reader::from_descriptor_chain(mem, chain.clone())
                .and_then(|r| VirtioFsWriter::new(mem, chain.clone()).map(|w| (r, w)))
                .map_err(|e| e.to_string())
                .and_then(|(r, w)| {
                    server
                        .handle_message(r, w.into(), None, None)
                        .map_err(|e| e.to_string())
                });
            let len = answered.unwrap_or_else(|e| {
                tracing::warn!(head, "bad request from the guest: {e}");
                0
            });
            if let Err(e) = vring.add_used(head, len as u32) {
                tracing::warn!(head, "cannot return a request to the guest: {e}");
            }
            let notify = !event_idx || vring.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::warn!("cannot notify the guest: {e}");
                }
            }
            drop(guard);
        });
    }

    /// Writes the device state to `file` once the requests in flight are done.
    fn save(&self, mut file: File) -> Transfer {
        let in_flight = self.in_flight.clone();
        let fs = self.fs.clone();
        let manifest = self.manifest;
        let timeout = self.drain_timeout;
        std::thread::spawn(move || {
            if !in_flight.wait_idle(timeout) {
                return Err(format!(
                    "requests still in flight after {timeout:?}: refusing to save a state that would lose them"
                ));
            }
            let state = fs.handles.save(manifest);
            tracing::info!(handles = state.handles.len(), "saving device state");
            file.write_all(&state.encode())
                .map_err(|e| format!("cannot write the device state: {e}"))
        })
    }

    /// Reads a device state from `file` and takes over its handles.
    fn load(&self, mut file: File) -> Transfer {
        let fs = self.fs.clone();
        let manifest = self.manifest;
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            (&mut file)
                .take(64 << 20)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read the device state: {e}"))?;
            let state = DeviceState::decode(&bytes).map_err(|e| e.to_string())?;
            if state.manifest != manifest {
                return Err(format!(
                    "the device state is for image {}, but this backend serves {manifest}: start it with the image the VM was snapshotted with",
                    state.manifest
                ));
            }
            fs.handles.load(&state);
            tracing::info!(handles = state.handles.len(), "took over the device state");
            Ok(())
        })
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        // The high-priority queue, then the request queues.
        1 + self.request_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: AtomicMemory) -> io::Result<()> {
        *self.mem.write().expect("memory lock") = Some(mem);
        Ok(())
    }

    /// One event thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected queue event {evset:?}"
            )));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        let mem = self
            .mem
            .read()
            .expect("memory lock")
            .as_ref()
            .ok_or_else(|| io::Error::other("a queue was kicked before guest memory was set"))?
            .memory()
            .into_inner();
        if !self.event_idx.load(Ordering::Acquire) {
            self.drain(vring, &mem);
            return Ok(());
        }
        // With EVENT_IDX, notifications stay off while draining; re-enabling
        // them reports whether more arrived meanwhile.
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            self.drain(vring, &mem);
            if !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::other(format!(
                "unsupported transfer phase {phase:?}"
            )));
        }
        let transfer = match direction {
            VhostTransferStateDirection::SAVE => self.save(file),
            VhostTransferStateDirection::LOAD => self.load(file),
        };
        *self.transfer.lock().expect("transfer lock") = Some(transfer);
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let transfer = self.transfer.lock().expect("transfer lock").take();
        let Some(transfer) = transfer else {
            return Err(io::Error::other("no device state transfer was started"));
        };
        match transfer.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => {
                tracing::error!("device state transfer failed: {why}");
                Err(io::Error::other(why))
            }
            Err(_) => Err(io::Error::other("device state transfer panicked")),
        }
    }
}

/// Requests taken from the guest and not yet returned.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
    pub(crate) total: AtomicUsize,
}

pub(crate) struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        *self.count.lock().expect("in-flight lock") += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    /// Waits until no request is in flight; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.count.lock().expect("in-flight lock");
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self.idle.wait_timeout(n, left).expect("in-flight lock").0;
        }
        true
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().expect("in-flight lock");
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_idle_waits_for_the_last_request() {
        let f = Arc::new(InFlight::default());
        let g = f.enter();
        assert!(!f.wait_idle(Duration::from_millis(20)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(g);
        });
        assert!(f.wait_idle(Duration::from_secs(5)));
        t.join().unwrap();
    }
}
