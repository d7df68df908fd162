//! [`VirtioBlock`]: the virtio-blk device model (features, config space, activation, reset).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use journal::Volume;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{self, BackendKind};
use crate::config::{self, bit, QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX};
use crate::gate::RequestGate;
use crate::request::VIRTIO_BLK_ID_BYTES;
use crate::virtio::{ActivateContext, VirtioDevice, VirtioDeviceState};
use crate::virtio_exec::GuestExecutor;
use crate::worker::{SnapshotLink, Worker, WorkerSnapshot};
use crate::Error;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// How long a checkpoint waits for the worker to report its queues.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

struct Running {
    stop: EventFd,
    thread: JoinHandle<()>,
    /// The device's end of the worker's checkpoint channel.
    snapshot_evt: EventFd,
    snapshot_requests: mpsc::Sender<u64>,
    snapshot_replies: mpsc::Receiver<(u64, WorkerSnapshot)>,
    snapshot_seq: u64,
}

impl Running {
    /// Asks the worker for its queues and waits for the answer.
    fn snapshot(&mut self) -> Result<WorkerSnapshot, Error> {
        self.snapshot_seq += 1;
        let seq = self.snapshot_seq;
        let gone = || Error::Snapshot("the block worker has stopped".into());
        self.snapshot_requests.send(seq).map_err(|_| gone())?;
        self.snapshot_evt.write(1)?;
        let deadline = std::time::Instant::now() + SNAPSHOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.snapshot_replies.recv_timeout(left) {
                Ok((s, snap)) if s == seq => return Ok(snap),
                Ok(_) => continue, // an answer to an earlier request that timed out
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::Snapshot(format!(
                        "the block worker did not report its queues within {SNAPSHOT_TIMEOUT:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }
}

/// A virtio-blk device over a journal volume.
pub struct VirtioBlock {
    volume: Arc<Volume>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    backend: BackendKind,
    avail_features: u64,
    acked_features: u64,
    config: [u8; config::CONFIG_LEN],
    queue_sizes: [u16; 1],
    needs_reset: Arc<AtomicBool>,
    running: Option<Running>,
    gate: Option<Arc<dyn RequestGate>>,
}

impl VirtioBlock {
    /// A device serving `volume`; `id` is the serial returned by GET_ID (at most 20 bytes:
    /// longer ids are cut to their first 20 bytes).
    pub fn new(volume: Arc<Volume>, id: String) -> Result<VirtioBlock, Error> {
        let size = volume.size();
        if size == 0 || !size.is_multiple_of(journal::SECTOR_SIZE) {
            return Err(Error::VolumeSize(size));
        }
        let bytes = id.as_bytes();
        if bytes.len() > VIRTIO_BLK_ID_BYTES {
            tracing::warn!(id = %id, "block device id is longer than 20 bytes; truncated");
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = bytes.len().min(VIRTIO_BLK_ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        let read_only = volume.read_only();
        Ok(VirtioBlock {
            avail_features: config::avail_features(read_only),
            acked_features: 0,
            config: config::config_space(size),
            id: serial,
            volume,
            backend: BackendKind::default(),
            queue_sizes: [QUEUE_SIZE],
            needs_reset: Arc::new(AtomicBool::new(false)),
            running: None,
            gate: None,
        })
    }

    /// Chooses how requests run (io_uring by default).
    pub fn with_backend(mut self, kind: BackendKind) -> Self {
        self.backend = kind;
        self
    }

    /// Makes the worker take an admission from `gate` before starting each request, so a
    /// controller can stop new I/O and wait for in-flight I/O (see [`crate::gate`]).
    pub fn with_gate(mut self, gate: Arc<dyn RequestGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The volume served.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// True while the worker thread runs.
    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= self.config.len() {
            return;
        }
        let n = data.len().min(self.config.len() - start);
        data[..n].copy_from_slice(&self.config[start..start + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No field is writable: `writeback` would need VIRTIO_BLK_F_CONFIG_WCE (not offered).
        tracing::debug!(
            offset,
            len = data.len(),
            "ignored a write to the block config space"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), Error> {
        if self.running.is_some() {
            return Err(Error::Activate("the device is already active".into()));
        }
        let ActivateContext {
            mem,
            interrupt,
            mut queues,
        } = ctx;
        if queues.len() != self.queue_sizes.len() {
            return Err(Error::Activate(format!(
                "expected 1 queue, got {}",
                queues.len()
            )));
        }
        let event_idx = self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        for (q, _) in &mut queues {
            if !q.is_valid(&mem) {
                return Err(Error::Activate(
                    "the virtqueue is not valid in guest memory".into(),
                ));
            }
            q.set_event_idx(event_idx);
        }
        let limits = config::limits(
            self.volume.size(),
            self.volume.read_only(),
            self.acked_features,
        );
        let write_through = !limits.flush;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let worker_stop = stop.try_clone()?;
        let (volume, kind, id, needs_reset) = (
            self.volume.clone(),
            self.backend,
            self.id,
            self.needs_reset.clone(),
        );
        let gate = self.gate.clone();
        self.needs_reset.store(false, Ordering::SeqCst);
        let snapshot_evt = EventFd::new(EFD_NONBLOCK)?;
        let (req_tx, req_rx) = mpsc::channel();
        let (rep_tx, rep_rx) = mpsc::channel();
        let link = SnapshotLink {
            evt: snapshot_evt.try_clone()?,
            requests: req_rx,
            replies: rep_tx,
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), Error>>(1);
        let depth = usize::from(QUEUE_SIZE);
        let thread = std::thread::Builder::new()
            .name("strata-blk".into())
            .spawn(move || {
                // The backend is built on its own thread: io_uring stays with one owner.
                let backend = match backend::open(kind, volume, depth as u32) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut executor =
                    match GuestExecutor::new(backend, id, depth, config::MAX_BUFFER_BYTES, gate) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                executor.set_write_through(write_through);
                let _ = ready_tx.send(Ok(()));
                Worker {
                    mem,
                    interrupt,
                    queues,
                    limits,
                    executor,
                    needs_reset,
                    stop: worker_stop,
                    snapshot: link,
                }
                .run();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                self.running = Some(Running {
                    stop,
                    thread,
                    snapshot_evt,
                    snapshot_requests: req_tx,
                    snapshot_replies: rep_rx,
                    snapshot_seq: 0,
                });
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Activate(
                    "the block worker thread died while starting".into(),
                ))
            }
        }
    }

    fn reset(&mut self) -> bool {
        let Some(running) = self.running.take() else {
            return false;
        };
        if let Err(e) = running.stop.write(1) {
            tracing::error!(error = %e, "cannot stop the block worker");
        }
        if running.thread.join().is_err() {
            tracing::error!("the block worker thread panicked");
        }
        self.acked_features = 0;
        self.needs_reset.store(false, Ordering::SeqCst);
        true
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn save_state(&mut self) -> Result<VirtioDeviceState, Error> {
        let queues = match self.running.as_mut() {
            Some(running) => {
                let snap = running.snapshot()?;
                if snap.in_flight > 0 {
                    return Err(Error::Snapshot(format!(
                        "{} requests are in flight (drain the device first)",
                        snap.in_flight
                    )));
                }
                snap.queues
            }
            None => Vec::new(),
        };
        Ok(VirtioDeviceState {
            acked_features: self.acked_features,
            config: self.config.to_vec(),
            needs_reset: self.needs_reset(),
            queues,
        })
    }

    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        ctx: Option<ActivateContext>,
    ) -> Result<(), Error> {
        if self.running.is_some() {
            return Err(Error::Snapshot(
                "cannot restore into an active device".into(),
            ));
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(Error::Snapshot(format!(
                "the checkpoint's driver accepted features {:#x} this device does not offer",
                state.acked_features & !self.avail_features
            )));
        }
        if state.config != self.config {
            return Err(Error::Snapshot(
                "the checkpoint's block configuration (size, limits) differs from this disk's"
                    .into(),
            ));
        }
        self.acked_features = state.acked_features;
        if let Some(ctx) = ctx {
            if ctx.queues.len() != state.queues.len() {
                return Err(Error::Snapshot(format!(
                    "{} queues given for {} saved",
                    ctx.queues.len(),
                    state.queues.len()
                )));
            }
            self.activate(ctx)?;
        }
        if state.needs_reset {
            self.needs_reset.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
