//! `strata bench ...`: benchmarks that compare Strata with the systems it replaces, measured
//! in one run against a same-run baseline (ratios only; nothing here asserts on time).
//!
//! `depth` (issue 2) measures 4 KiB random reads, 4 KiB allocating random writes and 64 KiB
//! sequential writes at growing checkpoint-chain depths for the journal driven in-process
//! (`journal-api`), a raw file under fio (`raw-fio`), `strata disk serve` over NBD
//! (`strata-nbd`) and `qemu-nbd` serving an equivalent qcow2 chain (`qcow2-nbd`).
//!
//! Modules: `pattern` (deterministic offsets and layer contents shared by every target),
//! `journal_run` (the in-process io_uring driver), `rawring` (a raw file on io_uring, for the
//! criterion bench), `fio` (fio jobs and their JSON), `procs` (NBD servers and the qcow2
//! chain), `report` (CSV, markdown and ratios), `plot` (the SVG) and `depth` (the run).
//!
//! `merge` (issue 8, the run is `crate::bench_merge`) deletes a checkpoint with each merge
//! strategy: `merge_layout` (the chain), `merge_run` (one idle delete and the measurements
//! around it), `merge_served` (a delete under load through the control socket), `merge_space` (host allocation), `fio_load` (the foreground load and its windows),
//! `ringcopy` and `qcow2_commit` (the baselines), `merge_report` and `bars` (CSV, tables,
//! plots).

pub mod bars;
pub mod depth;
pub mod fio;
pub mod fio_load;
pub mod journal_run;
pub mod merge_layout;
pub mod merge_report;
pub mod merge_run;
pub mod merge_served;
pub mod merge_space;
pub mod pattern;
pub mod plot;
pub mod procs;
pub mod qcow2_commit;
pub mod rawring;
pub mod report;
pub mod ringcopy;
pub mod scratch;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::Error;

/// Options of `strata bench depth`.
#[derive(Args, Debug, Clone)]
pub struct DepthArgs {
    /// Directory for depth.csv, depth.md and depth.svg (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Virtual disk size (suffixes K, M, G); also the size of the raw baseline file.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Chain depths to measure (layers: depth-1 checkpoints plus Now), comma separated.
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',')]
    pub depths: Vec<usize>,
    /// Seconds per measured cell (fractions allowed).
    #[arg(long, default_value_t = 4.0)]
    pub runtime: f64,
    /// Runs of every cell; the best is kept (other jobs on the host only ever slow a run
    /// down). Repeats run the targets in reverse order (A B B A) to spread drift evenly.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Scattered 4 KiB writes held by each layer.
    #[arg(long, default_value_t = 1024)]
    pub writes_per_layer: u64,
    /// Scratch directory for the images; its filesystem is what gets measured. Created,
    /// and removed afterwards unless --keep-workdir. Default: a fresh directory in $TMPDIR.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Leave the images in the work directory.
    #[arg(long)]
    pub keep_workdir: bool,
    /// Measure nothing: re-render depth.md and depth.svg in --out from this depth.csv (the
    /// preamble of an existing --out/depth.md is kept).
    #[arg(long, value_name = "CSV")]
    pub from_csv: Option<PathBuf>,
    /// Measure only journal-api and raw-fio (no qemu tools, no NBD server).
    #[arg(long)]
    pub skip_nbd: bool,
    /// Do not run the test guest (guest-virtio: `strata run --disk` through virtio-blk).
    #[arg(long)]
    pub skip_guest: bool,
    /// Operations of every guest-virtio run (the guest counts operations, not time).
    #[arg(long, default_value_t = 20_000)]
    pub guest_ops: u64,
}

/// What a cell does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// 4 KiB reads at uniformly random offsets (no repeats until every block was read).
    RandRead,
    /// 4 KiB writes at random offsets into a fresh top layer (each block at most once).
    RandWrite,
    /// 64 KiB writes from offset 0 upwards into a fresh top layer.
    SeqWrite,
    /// 4 KiB random writes like `RandWrite`, with a FLUSH after every 8 writes (fio
    /// `--fdatasync=8` on the raw file).
    RandWriteFlush8,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::RandRead,
        Workload::RandWrite,
        Workload::SeqWrite,
        Workload::RandWriteFlush8,
    ];

    /// Writes between two FLUSHes (0: none).
    pub fn flush_every(self) -> u32 {
        match self {
            Workload::RandWriteFlush8 => 8,
            _ => 0,
        }
    }

    /// The name used in the CSV (also fio's `rw=` value, except for seqwrite).
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::SeqWrite => "seqwrite",
            Workload::RandWriteFlush8 => "randwrite-flush8",
        }
    }

    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// Request size in bytes.
    pub fn block_size(self) -> u64 {
        match self {
            Workload::RandRead | Workload::RandWrite | Workload::RandWriteFlush8 => 4096,
            Workload::SeqWrite => 65536,
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, Workload::RandRead)
    }

    pub fn is_random(self) -> bool {
        !matches!(self, Workload::SeqWrite)
    }
}

/// One measured cell: how many requests of how many bytes completed in how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl Measured {
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

/// An error from an external tool or a failed benchmark step.
pub(crate) fn fail(context: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::io(context, std::io::Error::other(detail.into()))
}

/// A positive duration from seconds given on the command line.
pub(crate) fn runtime_from_secs(secs: f64) -> crate::Result<Duration> {
    if !secs.is_finite() || secs <= 0.0 || secs > 3600.0 {
        return Err(Error::Usage(format!(
            "--runtime must be between 0 and 3600 seconds, got {secs}"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::from_name(w.name()), Some(w));
        }
        assert_eq!(Workload::from_name("trim"), None);
        assert_eq!(Workload::SeqWrite.block_size(), 65536);
        assert!(Workload::RandWrite.is_write() && !Workload::RandRead.is_write());
    }

    #[test]
    fn measured_rates() {
        let m = Measured {
            ops: 1000,
            bytes: 4_096_000,
            secs: 2.0,
        };
        assert_eq!(m.iops(), 500.0);
        assert!((m.mb_per_s() - 2.048).abs() < 1e-9);
        assert_eq!(
            Measured {
                ops: 1,
                bytes: 1,
                secs: 0.0
            }
            .iops(),
            0.0
        );
    }

    #[test]
    fn runtime_bounds() {
        assert!(runtime_from_secs(0.0).is_err());
        assert!(runtime_from_secs(f64::NAN).is_err());
        assert_eq!(runtime_from_secs(1.5).unwrap(), Duration::from_millis(1500));
    }
}
