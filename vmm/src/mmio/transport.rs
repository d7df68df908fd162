//! The virtio-mmio register file: feature negotiation, device status, queue configuration,
//! notifications, and activation/reset of the device it owns.

use std::sync::Arc;

use block::{ActivateContext, VirtioDevice, VirtioDeviceState};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::MmioInterrupt;
use super::regs::*;
use crate::snapshot::devices::{MmioState, QueueSnapshot, VirtioDeviceSnapshot};
use crate::{Error, Result};

/// VIRTIO_RING_F_EVENT_IDX.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// One queue's configuration as written by the driver (plain data until activation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// Builds the `virtio_queue::Queue` the device will use.
    fn build(&self, event_idx: bool) -> std::result::Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        q.try_set_size(self.size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(self.ready);
        Ok(q)
    }
}

/// A virtio-mmio transport owning one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
}

fn set_half(word: &mut u64, high: bool, value: u32) {
    if high {
        *word = (*word & 0xffff_ffff) | (u64::from(value) << 32);
    } else {
        *word = (*word & !0xffff_ffff) | u64::from(value);
    }
}

impl MmioTransport {
    /// Creates the transport for `device`, with one notification eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
    ) -> Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.is_empty() {
            return Err(Error::Config("virtio device has no queues".into()));
        }
        for &s in &sizes {
            if s == 0 || !s.is_power_of_two() || s > 32768 {
                return Err(Error::Config(format!(
                    "virtio queue max size {s} is invalid"
                )));
            }
        }
        let queue_evts = sizes
            .iter()
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("creating a queue eventfd"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues: sizes.into_iter().map(QueueConfig::new).collect(),
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
        })
    }

    /// The per-queue notification eventfds, in queue order (register each as an ioeventfd on
    /// the QueueNotify register with the queue index as datamatch).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt state.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The Status register as the driver sees it.
    pub fn status(&self) -> u32 {
        if self.device.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// True while the device is activated.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The transport, its queues and its device for a checkpoint. The vCPUs must be paused and
    /// the device drained (it refuses while requests are in flight).
    pub fn save_state(&mut self) -> Result<MmioState> {
        let dev = self.device.save_state()?;
        let queues: Vec<QueueSnapshot> = if self.active {
            if dev.queues.len() != self.queues.len() {
                return Err(Error::Capture(format!(
                    "the device reported {} queues, the transport has {}",
                    dev.queues.len(),
                    self.queues.len()
                )));
            }
            dev.queues.iter().map(QueueSnapshot::from).collect()
        } else {
            let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
            self.queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc,
                    avail_ring: q.driver,
                    used_ring: q.device,
                    next_avail: 0,
                    next_used: 0,
                    event_idx_enabled: event_idx,
                })
                .collect()
        };
        Ok(MmioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
            device: VirtioDeviceSnapshot {
                acked_features: dev.acked_features,
                config: dev.config,
                needs_reset: dev.needs_reset,
            },
        })
    }

    /// Puts a freshly created transport (device never activated) into the saved `state`;
    /// when the device was active it is restarted on the saved queues and picks up the chains
    /// waiting in their available rings. Everything is checked before the device starts.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<()> {
        if self.active || self.status != 0 {
            return Err(Error::State(
                "restoring into a transport that is in use".into(),
            ));
        }
        state.validate(&self.mem)?;
        if state.device_type != self.device.device_type() {
            return Err(Error::State(format!(
                "the checkpoint's virtio device has type {}, this VM's has {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(Error::State(format!(
                "the checkpoint's virtio device has {} queues, this VM's has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (i, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size {
                return Err(Error::State(format!(
                    "queue {i}: the checkpoint's maximum size is {}, this device's is {}",
                    saved.max_size, ours.max_size
                )));
            }
        }
        let offered = self.device_features();
        if state.driver_features & !offered != 0 {
            return Err(Error::State(format!(
                "the checkpoint's driver accepted features {:#x} this device does not offer",
                state.driver_features & !offered
            )));
        }
        let ctx = if state.active {
            let mut queues = Vec::with_capacity(state.queues.len());
            for (saved, evt) in state.queues.iter().zip(&self.queue_evts) {
                let q = saved.to_queue(&self.mem, true)?;
                let evt = evt
                    .try_clone()
                    .map_err(Error::io("cloning a queue eventfd"))?;
                queues.push((q, evt));
            }
            Some(ActivateContext {
                mem: self.mem.clone(),
                interrupt: Arc::clone(&self.interrupt) as Arc<dyn block::VirtioInterrupt>,
                queues,
            })
        } else {
            None
        };
        let dev = VirtioDeviceState {
            acked_features: state.device.acked_features,
            config: state.device.config.clone(),
            needs_reset: state.device.needs_reset,
            queues: state.queues.iter().map(QueueState::from).collect(),
        };
        self.device.restore_state(&dev, ctx)?;
        for (cfg, saved) in self.queues.iter_mut().zip(&state.queues) {
            cfg.size = saved.size;
            cfg.ready = saved.ready;
            cfg.desc = saved.desc_table;
            cfg.driver = saved.avail_ring;
            cfg.device = saved.used_ring;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        // NEEDS_RESET is reported from the device, not stored in the register.
        self.status = state.status & !STATUS_DEVICE_NEEDS_RESET;
        self.active = state.active;
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        Ok(())
    }

    /// Stops the device (VM shutdown).
    pub fn shutdown(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn device_features(&self) -> u64 {
        self.device.avail_features() | VIRTIO_F_VERSION_1
    }

    /// Handles a guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            tracing::warn!(
                "virtio-mmio: bad register read at {offset:#x}, len {}",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            // No shared memory regions: length reads as all ones (-1).
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of write-only/unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: bad register write at {offset:#x}, len {}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            tracing::warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => self.write_driver_features(v),
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_reg(offset, v)
            }
            QUEUE_NOTIFY => self.notify(v),
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.write_status(v),
            SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write to read-only/unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let negotiating =
            self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) == STATUS_DRIVER;
        if !negotiating {
            tracing::warn!("virtio-mmio: DriverFeatures written outside feature negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, false, v),
            1 => set_half(&mut self.driver_features, true, v),
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let configuring = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK;
        if !configuring {
            tracing::warn!("virtio-mmio: queue register {offset:#x} written outside queue setup");
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            tracing::warn!(
                "virtio-mmio: queue register written for absent queue {}",
                self.queue_sel
            );
            return;
        };
        match offset {
            QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
            QUEUE_READY => q.ready = v == 1,
            QUEUE_DESC_LOW => set_half(&mut q.desc, false, v),
            QUEUE_DESC_HIGH => set_half(&mut q.desc, true, v),
            QUEUE_DRIVER_LOW => set_half(&mut q.driver, false, v),
            QUEUE_DRIVER_HIGH => set_half(&mut q.driver, true, v),
            QUEUE_DEVICE_LOW => set_half(&mut q.device, false, v),
            QUEUE_DEVICE_HIGH => set_half(&mut q.device, true, v),
            _ => {}
        }
    }

    /// A QueueNotify that reached userspace (no ioeventfd, or before it was registered).
    fn notify(&mut self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: queue {v} notify: {e}");
                }
            }
            None => tracing::warn!("virtio-mmio: notify for absent queue {v}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::warn!("virtio-mmio: status {old:#x} -> {v:#x} clears bits; ignored");
            return;
        }
        let added = v & !old;
        if added & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        let prerequisite = |bit: u32, need: u32| added & bit == 0 || v & need == need;
        let ok = prerequisite(STATUS_DRIVER, STATUS_ACKNOWLEDGE)
            && prerequisite(STATUS_FEATURES_OK, STATUS_DRIVER)
            && prerequisite(STATUS_DRIVER_OK, STATUS_FEATURES_OK)
            && added
                & !(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
                == 0;
        if !ok {
            tracing::warn!("virtio-mmio: invalid status transition {old:#x} -> {v:#x}");
            return;
        }
        let mut new = v;
        if added & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            // Leave FEATURES_OK clear: the driver reads it back and gives up.
            new &= !STATUS_FEATURES_OK;
            new &= !STATUS_DRIVER_OK;
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn accept_features(&mut self) -> bool {
        let avail = self.device_features();
        if self.driver_features & !avail != 0 {
            tracing::warn!(
                "virtio-mmio: driver accepted unoffered features {:#x}",
                self.driver_features & !avail
            );
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        self.device.set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        match self.build_context() {
            Ok(ctx) => match self.device.activate(ctx) {
                Ok(()) => self.active = true,
                Err(e) => {
                    tracing::error!("virtio-mmio: device activation failed: {e}");
                    self.fail_needs_reset();
                }
            },
            Err(what) => {
                tracing::error!("virtio-mmio: cannot activate: {what}");
                self.fail_needs_reset();
            }
        }
    }

    fn fail_needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        use block::VirtioInterrupt;
        if let Err(e) = self.interrupt.signal_config_change() {
            tracing::warn!("virtio-mmio: config interrupt: {e}");
        }
    }

    fn build_context(&self) -> std::result::Result<ActivateContext, String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (cfg, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            let q = cfg
                .build(event_idx)
                .map_err(|e| format!("queue {i} configuration: {e}"))?;
            if cfg.ready && !q.is_valid(&self.mem) {
                return Err(format!("queue {i} rings are outside guest memory"));
            }
            let evt = evt
                .try_clone()
                .map_err(|e| format!("queue {i} eventfd: {e}"))?;
            queues.push((q, evt));
        }
        if !self.queues.iter().any(|q| q.ready) {
            return Err("no queue is ready".into());
        }
        Ok(ActivateContext {
            mem: self.mem.clone(),
            interrupt: Arc::clone(&self.interrupt) as Arc<dyn block::VirtioInterrupt>,
            queues,
        })
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        self.queues = max.into_iter().map(QueueConfig::new).collect();
        for evt in &self.queue_evts {
            // Drain stale notifications; EAGAIN (nothing pending) is the normal case.
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
