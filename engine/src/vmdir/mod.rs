//! A VM is a directory: its hardware configuration, its disk (whose checkpoint tree is the
//! VM's tree), and the saved state of each checkpoint.
//!
//! ```text
//! DIR/
//!   vm.json              configuration (spec.rs), replaced atomically
//!   disk/                the journal disk: `strata disk ...` works on it
//!   kernel, initrd       copies of a Linux guest's files, so the directory stands alone
//!   checkpoints/<id>/    the state of disk checkpoint <id> (store.rs)
//!   checkpoints/resume.json   the checkpoint the next `strata run --vm DIR` resumes from
//!   api.sock             control socket of the running VM (default of `--api`)
//! ```

pub mod files;
pub mod spec;
pub mod store;

use std::fs;
use std::path::{Path, PathBuf};

use journal::{Disk, OpenOptions};

use crate::{Error, Result};
pub use spec::{CacheSpec, GuestSpec, VmSpec};
pub use store::{MachineMeta, MemoryMode, StateMeta, Store};

/// Name of the configuration file.
pub const SPEC_FILE: &str = "vm.json";
/// Name of the disk directory.
pub const DISK_DIR: &str = "disk";
/// Name of the default control socket.
pub const API_SOCKET: &str = "api.sock";
/// Largest kernel or initrd copied into a VM directory.
const MAX_GUEST_FILE: u64 = 1 << 30;

/// What `strata vm create` makes.
pub struct CreateOptions {
    pub memory: u64,
    pub vcpus: u8,
    pub cache: CacheSpec,
    /// Disk size (ignored with a base, whose size is used).
    pub disk_size: u64,
    pub base: Option<PathBuf>,
    pub guest: NewGuest,
}

/// The guest of a new VM.
pub enum NewGuest {
    TestGuest {
        workload: String,
    },
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// An opened VM directory.
pub struct VmDir {
    pub path: PathBuf,
    pub spec: VmSpec,
    pub store: Store,
}

impl VmDir {
    /// Creates a VM directory (DIR must not exist, or be empty).
    pub fn create(path: &Path, opts: CreateOptions) -> Result<VmDir> {
        if let Ok(mut rd) = fs::read_dir(path) {
            if rd.next().is_some() {
                return Err(Error::Usage(format!(
                    "{} exists and is not empty",
                    path.display()
                )));
            }
        } else if path.exists() {
            return Err(Error::Usage(format!(
                "{} exists and is not a directory",
                path.display()
            )));
        }
        fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let result = Self::fill(path, opts);
        if result.is_err() {
            let _ = fs::remove_dir_all(path);
        }
        result
    }

    fn fill(path: &Path, opts: CreateOptions) -> Result<VmDir> {
        let guest = match opts.guest {
            NewGuest::TestGuest { workload } => GuestSpec::TestGuest { workload },
            NewGuest::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                files::copy_capped(&kernel, &path.join("kernel"), MAX_GUEST_FILE)?;
                let initrd = match initrd {
                    Some(i) => {
                        files::copy_capped(&i, &path.join("initrd"), MAX_GUEST_FILE)?;
                        Some(PathBuf::from("initrd"))
                    }
                    None => None,
                };
                GuestSpec::Linux {
                    kernel: PathBuf::from("kernel"),
                    initrd,
                    cmdline,
                }
            }
        };
        let spec = VmSpec {
            format: spec::SPEC_FORMAT,
            uuid: spec::new_uuid()?,
            memory: opts.memory,
            vcpus: opts.vcpus,
            cache: opts.cache,
            guest,
        };
        spec.validate()?;
        let size = match &opts.base {
            Some(b) => fs::metadata(b)
                .map_err(|e| Error::io(format!("base image {}", b.display()), e))?
                .len(),
            None => opts.disk_size,
        };
        Disk::create(&path.join(DISK_DIR), size, opts.base.as_deref())?;
        spec.save(&path.join(SPEC_FILE))?;
        let store = Store::open(path)?;
        Ok(VmDir {
            path: path.to_path_buf(),
            spec,
            store,
        })
    }

    /// Opens a VM directory.
    pub fn open(path: &Path) -> Result<VmDir> {
        let spec_path = path.join(SPEC_FILE);
        if !spec_path.exists() {
            return Err(Error::Usage(format!(
                "{} is not a Strata VM directory (no {SPEC_FILE})",
                path.display()
            )));
        }
        let spec = VmSpec::load(&spec_path)?;
        let store = Store::open(path)?;
        Ok(VmDir {
            path: path.to_path_buf(),
            spec,
            store,
        })
    }

    /// The disk directory.
    pub fn disk_dir(&self) -> PathBuf {
        self.path.join(DISK_DIR)
    }

    /// The default control socket.
    pub fn api_path(&self) -> PathBuf {
        self.path.join(API_SOCKET)
    }

    /// Opens the VM's disk for writing and finishes any checkpoint a crash interrupted.
    pub fn open_disk(&self) -> Result<Disk> {
        let mut disk = Disk::open(
            &self.disk_dir(),
            OpenOptions {
                cache: self.spec.cache.into(),
                read_only: false,
            },
        )
        .map_err(|e| match e {
            journal::Error::Locked(_) => Error::Usage(format!(
                "the VM in {} is running (its disk is in use); use --api {}",
                self.path.display(),
                self.api_path().display()
            )),
            e => e.into(),
        })?;
        self.store.recover(&mut disk)?;
        Ok(disk)
    }

    /// Replaces the configuration (after applying a checkpoint that saved another one).
    pub fn set_spec(&mut self, spec: VmSpec) -> Result<()> {
        if spec.uuid != self.spec.uuid {
            return Err(Error::Vm(format!(
                "checkpoint configuration belongs to VM {}, not {}",
                spec.uuid, self.spec.uuid
            )));
        }
        if spec != self.spec {
            spec.save(&self.path.join(SPEC_FILE))?;
            self.spec = spec;
        }
        Ok(())
    }

    /// Absolute path of a guest file named in the spec.
    pub fn guest_file(&self, name: &Path) -> PathBuf {
        self.path.join(name)
    }
}
