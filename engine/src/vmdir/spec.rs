//! `vm.json`: a VM's hardware configuration (memory, vCPUs, devices, guest), the part of a VM
//! that a checkpoint of a stopped VM holds beside its disk.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files;
use crate::{Error, Result};

/// Format version of `vm.json` written by this build.
pub const SPEC_FORMAT: u32 = 1;
/// Largest `vm.json` accepted.
const MAX_SPEC_BYTES: u64 = 1 << 20;
/// Most vCPUs a VM directory may ask for (the VMM checks the host's own limit at start).
const MAX_VCPUS: u8 = 64;

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestSpec {
    /// The built-in test guest with a workload (normalised text).
    TestGuest { workload: String },
    /// A Linux kernel; the files are copies inside the VM directory (names relative to it).
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// The block device's host cache mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSpec {
    None,
    Writeback,
}

impl From<CacheSpec> for journal::CacheMode {
    fn from(c: CacheSpec) -> Self {
        match c {
            CacheSpec::None => journal::CacheMode::None,
            CacheSpec::Writeback => journal::CacheMode::Writeback,
        }
    }
}

/// A VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub format: u32,
    /// 32 hex digits: the VM's identity, written into every state and memory file.
    pub uuid: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: u8,
    pub cache: CacheSpec,
    pub guest: GuestSpec,
}

impl VmSpec {
    /// The uuid as 16 bytes.
    pub fn uuid_bytes(&self) -> Result<[u8; 16]> {
        let v = u128::from_str_radix(&self.uuid, 16)
            .ok()
            .filter(|_| self.uuid.len() == 32)
            .ok_or_else(|| Error::Usage(format!("vm.json: bad uuid {:?}", self.uuid)))?;
        Ok(v.to_be_bytes())
    }

    /// Checks every field a user or a damaged file could have set.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Usage(format!("vm.json: {why}")));
        if self.format != SPEC_FORMAT {
            return bad(format!(
                "format {}, this build reads format {SPEC_FORMAT}",
                self.format
            ));
        }
        self.uuid_bytes()?;
        if self.memory < vmm::memory::MIN_MEM_SIZE || !self.memory.is_multiple_of(4096) {
            return bad(format!(
                "memory {} must be a multiple of 4096 and at least {}",
                self.memory,
                vmm::memory::MIN_MEM_SIZE
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus {} must be 1..={MAX_VCPUS}", self.vcpus));
        }
        match &self.guest {
            GuestSpec::TestGuest { workload } => {
                if self.vcpus != 1 {
                    return bad("the test guest runs on exactly one vCPU".into());
                }
                vmm::test_guest::WorkloadSpec::parse(workload)
                    .map_err(|e| Error::Usage(format!("vm.json: workload: {e}")))?;
                vmm::test_guest::check_mem_size(self.memory)
                    .map_err(|e| Error::Usage(format!("vm.json: {e}")))?;
            }
            GuestSpec::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                for p in std::iter::once(kernel).chain(initrd.iter()) {
                    if !is_plain_name(p) {
                        return bad(format!(
                            "guest file {} must be a plain name inside the VM directory",
                            p.display()
                        ));
                    }
                }
                if cmdline.len() > 4096 || cmdline.chars().any(char::is_control) {
                    return bad("cmdline too long or with control characters".into());
                }
            }
        }
        Ok(())
    }

    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<VmSpec> {
        let bytes = files::read_capped(path, MAX_SPEC_BYTES)?;
        let spec: VmSpec = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Saves atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Protocol(e.to_string()))?;
        files::write_atomic(path, &text)
    }
}

/// True for a single normal path component (no `/`, `..`, or absolute path).
fn is_plain_name(p: &Path) -> bool {
    let mut c = p.components();
    matches!(
        (c.next(), c.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// A new random uuid as 32 hex digits.
pub fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(format!("{:032x}", u128::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            format: SPEC_FORMAT,
            uuid: new_uuid().unwrap(),
            memory: 128 << 20,
            vcpus: 1,
            cache: CacheSpec::None,
            guest: GuestSpec::TestGuest {
                workload: "seed=1".into(),
            },
        }
    }

    #[test]
    fn round_trips_and_refuses_bad_fields() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vm.json");
        let s = spec();
        s.save(&p).unwrap();
        assert_eq!(VmSpec::load(&p).unwrap(), s);
        type Case = (Box<dyn Fn(&mut VmSpec)>, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|s| s.format = 9), "format 9"),
            (Box::new(|s| s.uuid = "xyz".into()), "bad uuid"),
            (Box::new(|s| s.memory = 4097), "multiple of 4096"),
            (Box::new(|s| s.vcpus = 0), "vcpus 0"),
            (Box::new(|s| s.vcpus = 2), "exactly one vCPU"),
            (Box::new(|s| s.memory = 64 << 20), "at least 65 MiB"),
            (
                Box::new(|s| {
                    s.guest = GuestSpec::Linux {
                        kernel: "../../etc/passwd".into(),
                        initrd: None,
                        cmdline: String::new(),
                    }
                }),
                "plain name",
            ),
            (
                Box::new(|s| {
                    s.guest = GuestSpec::TestGuest {
                        workload: "qd=0".into(),
                    }
                }),
                "workload",
            ),
        ];
        for (change, want) in cases {
            let mut bad = spec();
            change(&mut bad);
            let text = serde_json::to_vec(&bad).unwrap();
            std::fs::write(&p, text).unwrap();
            let e = VmSpec::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        std::fs::write(&p, br#"{"format":1,"extra":true}"#).unwrap();
        assert!(VmSpec::load(&p).is_err());
    }
}
