//! The `strata` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Strata: a KVM VMM with a redirect-on-write journalled disk and live checkpoints.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Offline operations on a disk directory, and NBD serving.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Live checkpoint operations on a running VM or server, through its control socket.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Boot a VM: the built-in test guest, or a Linux kernel; `--vm DIR` runs a VM directory.
    Run(RunArgs),
    /// VM directories: a VM's configuration, disk and checkpoints in one place.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Benchmarks against same-run baselines.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Read/write speed against checkpoint-chain depth: journal, raw file, Strata and qcow2 over NBD.
    Depth(crate::bench::DepthArgs),
    /// The test guest's IOPS through virtio-blk beside the journal driven directly, and the
    /// time to the guest's first completed I/O.
    Guest(crate::bench_guest::GuestArgs),
    /// Whole-machine checkpoints of the busy test guest: pause, time to complete, bytes
    /// written (full and incremental), apply time, per memory size and memory mode.
    Checkpoint(crate::bench_checkpoint::CheckpointArgs),
    /// Deleting a checkpoint with each merge strategy, idle and under an fio load over NBD,
    /// beside an io_uring copy of the same bytes and `qemu-img commit` of a qcow2 chain.
    Merge(crate::bench_merge::MergeArgs),
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create a disk directory.
    Create {
        disk: PathBuf,
        /// Size in bytes (suffixes K, M, G, T); a multiple of 512.
        #[arg(long)]
        size: Option<String>,
        /// A raw image to reference read-only as the base (size defaults to its size).
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Show a summary of a disk.
    Info {
        disk: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint Now.
    Checkpoint {
        disk: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Show the checkpoint tree with a marker where Now is.
    Tree {
        disk: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make Now a fresh child of checkpoint NAME.
    Apply {
        disk: PathBuf,
        name: String,
        /// Checkpoint the current Now under this name first.
        #[arg(long = "save-current")]
        save_current: Option<String>,
    },
    /// Delete a checkpoint; everything else reads exactly as before. The checkpoint leaves
    /// the tree at once; then the merges run to completion with a progress display.
    Delete {
        disk: PathBuf,
        name: String,
        /// Also delete every descendant checkpoint (refused if Now descends from it).
        #[arg(long)]
        subtree: bool,
        #[command(flatten)]
        merge: MergeArgs,
    },
    /// Rename a checkpoint.
    Rename {
        disk: PathBuf,
        name: String,
        new_name: String,
    },
    /// Write a flattened raw image of a checkpoint (or of Now).
    Export {
        disk: PathBuf,
        name: Option<String>,
        #[arg(long)]
        output: PathBuf,
    },
    /// Verify every record and block checksum.
    Check { disk: PathBuf },
    /// Serve Now (read-write) or a checkpoint (read-only) over NBD.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    pub disk: PathBuf,
    /// Serve this checkpoint read-only instead of Now.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// unix:PATH (a socket only its owner may use, mode 0600) or tcp:HOST:PORT
    #[arg(long)]
    pub listen: String,
    /// Path of a control socket for live checkpoints (mode 0600; at most 16 clients, each
    /// dropped after 30 s without a request; a new client displaces the longest idle one).
    #[arg(long)]
    pub api: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
    #[command(flatten)]
    pub limits: ServeLimitArgs,
}

/// Limits that keep hostile or broken NBD clients from exhausting the server.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ServeLimitArgs {
    /// Clients connected at once (handshaking or transmitting); more are closed at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_clients: usize,
    /// Seconds a client has for the whole handshake (greeting to NBD_OPT_GO).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub handshake_timeout: u64,
    /// Seconds a connected client may leave the server with nothing to do (idle, stopped in
    /// the middle of a request, or not reading its replies) before it is disconnected;
    /// 0 never disconnects.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Request and reply data one client may hold in the server (suffixes K, M, G); one
    /// request of up to 32 MiB is always allowed when the client holds nothing else.
    #[arg(long, default_value = "32M", value_name = "SIZE")]
    pub client_buffer: String,
    /// Request and reply data all clients together may hold (at least 32M); a client that
    /// would exceed it stops being read until others' replies are read.
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    pub memory_budget: String,
}

impl ServeLimitArgs {
    /// The validated limits.
    pub fn server_limits(&self) -> crate::Result<crate::nbd::connection::ServerLimits> {
        use crate::nbd::protocol::MAX_PAYLOAD;
        use std::time::Duration;
        let usage = |m: String| crate::Error::Usage(m);
        if self.max_clients == 0 || self.max_clients > 4096 {
            return Err(usage(format!(
                "--max-clients {}: expected 1 to 4096",
                self.max_clients
            )));
        }
        if self.handshake_timeout == 0 || self.handshake_timeout > 3600 {
            return Err(usage(format!(
                "--handshake-timeout {}: expected 1 to 3600 seconds",
                self.handshake_timeout
            )));
        }
        let size = |flag: &str, text: &str| {
            crate::size::parse_size(text)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| usage(format!("{flag} {text:?}: expected a size such as 64M")))
        };
        let client_buffer = size("--client-buffer", &self.client_buffer)?;
        let memory_budget = size("--memory-budget", &self.memory_budget)?;
        if client_buffer == 0 {
            return Err(usage("--client-buffer must be more than 0".into()));
        }
        if memory_budget < MAX_PAYLOAD as usize {
            return Err(usage(format!(
                "--memory-budget {}: must hold at least one request of {} MiB",
                self.memory_budget,
                MAX_PAYLOAD >> 20
            )));
        }
        Ok(crate::nbd::connection::ServerLimits {
            max_clients: self.max_clients,
            memory_budget,
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            client_buffer,
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum CacheArg {
    None,
    Writeback,
}

impl From<CacheArg> for journal::CacheMode {
    fn from(c: CacheArg) -> Self {
        match c {
            CacheArg::None => journal::CacheMode::None,
            CacheArg::Writeback => journal::CacheMode::Writeback,
        }
    }
}

/// How a delete's data is merged.
#[derive(Args, Debug, Clone, Default)]
pub struct MergeArgs {
    /// Merge strategy: relink, compact-into-child, compact-into-parent, threshold, auto.
    #[arg(long, value_name = "S")]
    pub strategy: Option<String>,
    /// Bulk-copy rate limit in MB/s (10^6 bytes per second; fractions allowed).
    #[arg(long, value_name = "MB/s")]
    pub rate: Option<f64>,
}

/// Which VM or server a checkpoint verb acts on.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Where {
    /// The control socket of a running VM (`strata run --api`) or disk server.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// A VM directory: through its control socket when it runs, offline when it is stopped.
    #[arg(long)]
    pub vm: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Take a checkpoint (Checkpoint-VM): of a running VM, its whole machine at one instant.
    Create {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        name: String,
        /// How a running VM's memory is saved: `live` (write-protect, resume at once, save in
        /// the background) or `stop-copy` (saved during the pause).
        #[arg(long)]
        memory: Option<String>,
    },
    /// Show the checkpoint tree (Get-VMSnapshot), Now marked.
    List {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        json: bool,
    },
    /// Put the VM back to a checkpoint (Restore-VMSnapshot).
    Apply {
        #[command(flatten)]
        at: Where,
        name: String,
        /// Checkpoint the current state under this name first.
        #[arg(long = "save-current")]
        save_current: Option<String>,
    },
    /// Delete a checkpoint (Remove-VMSnapshot); everything else restores exactly as before.
    /// On a running VM or server the checkpoint leaves the tree at once and its data is
    /// merged in the background (see `checkpoint status`).
    Delete {
        #[command(flatten)]
        at: Where,
        name: String,
        /// Also delete every descendant checkpoint.
        #[arg(long)]
        subtree: bool,
        #[command(flatten)]
        merge: MergeArgs,
        /// Return only once the merges have finished, showing their progress.
        #[arg(long)]
        wait: bool,
    },
    /// Show the background merges of a running VM or server: bytes done / total, rate, ETA.
    Status {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        json: bool,
    },
    /// Rename a checkpoint.
    Rename {
        #[command(flatten)]
        at: Where,
        name: String,
        new_name: String,
    },
    /// Write a checkpoint as a standalone VM directory (Export-VMSnapshot).
    Export {
        #[command(flatten)]
        at: Where,
        name: String,
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM directory: configuration and a fresh disk.
    Create(VmCreateArgs),
}

#[derive(Args, Debug)]
pub struct VmCreateArgs {
    pub dir: PathBuf,
    #[arg(long, default_value = "256M")]
    pub memory: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Size of a fresh disk (suffixes K, M, G, T).
    #[arg(long, conflicts_with = "base")]
    pub disk_size: Option<String>,
    /// A raw image the disk references read-only as its base.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// A Linux kernel (copied into the VM directory).
    #[arg(long, conflicts_with = "workload")]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Test guest workload (the default guest), e.g. `seed=1,ops=20000,qd=32,dirty=16m`.
    #[arg(long)]
    pub workload: Option<String>,
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run a VM directory (`strata vm create`): a cold boot, or a resume from the checkpoint
    /// last applied to it. Its control socket defaults to DIR/api.sock.
    #[arg(long, conflicts_with_all = ["disk", "kernel", "initrd", "cmdline", "workload"])]
    pub vm: Option<PathBuf>,
    /// Disk directory (created fresh, 1 GiB, if it does not exist).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Guest RAM (default 256M).
    #[arg(long, conflicts_with = "vm")]
    pub memory: Option<String>,
    #[arg(long, default_value_t = 1, conflicts_with = "vm")]
    pub vcpus: u8,
    /// Control socket: `strata checkpoint ... --api PATH` takes checkpoints of the running VM
    /// (with --vm: whole-machine checkpoints, default DIR/api.sock).
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// stdio or a file path.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Test guest workload, e.g. `seed=1,ops=20000,read=50,bs=4k,qd=32,flush=64`.
    #[arg(long)]
    pub workload: Option<String>,
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,
}

/// Runs the CLI and maps errors to a one-line message and a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STRATA_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Disk(DiskCommand::Serve(args)) => crate::nbd::serve_cmd(args),
        Command::Disk(cmd) => crate::disk_cmd::run(cmd),
        Command::Checkpoint(cmd) => crate::checkpoint_cmd::run(cmd),
        Command::Vm(VmCommand::Create(args)) => crate::checkpoint_cmd::vm_create(args),
        Command::Run(args) => crate::run_cmd::run(args),
        Command::Bench(BenchCommand::Depth(args)) => crate::bench::depth::run(args),
        Command::Bench(BenchCommand::Guest(args)) => crate::bench_guest::run(args),
        Command::Bench(BenchCommand::Checkpoint(args)) => crate::bench_checkpoint::run(args),
        Command::Bench(BenchCommand::Merge(args)) => crate::bench_merge::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Formats an error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
