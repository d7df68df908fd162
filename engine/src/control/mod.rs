//! The control socket of a running server or VM: a unix socket speaking one JSON request per
//! line (`{"op":"checkpoint-create","name":"x"}`, `{"op":"checkpoint-list"}`) and answering
//! one JSON line (`{"ok":true,...}` or `{"ok":false,"error":"..."}`).
//!
//! What an operation does is up to a [`Target`]; [`DiskTarget`] takes live checkpoints of a
//! disk whose I/O goes through a [`Gate`].

pub mod client;
pub mod server;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use journal::{CheckpointInfo, Disk};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::quiesce::Gate;
use crate::{Error, Result};

pub use server::ControlServer;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Take a live checkpoint of Now.
    CheckpointCreate { name: String },
    /// List the checkpoints of the disk.
    CheckpointList,
}

/// What the control socket acts on.
pub trait Target: Send + Sync {
    /// Takes a checkpoint: every write acknowledged before is in it, no later write is.
    fn checkpoint_create(&self, name: &str) -> Result<CheckpointInfo>;
    /// All checkpoints, parents before children.
    fn checkpoint_list(&self) -> Result<Vec<CheckpointInfo>>;
}

/// Answers one request line with one JSON reply (without the newline).
pub fn handle_line(target: &dyn Target, line: &[u8]) -> String {
    let reply = match serde_json::from_slice::<Request>(line) {
        Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
        Ok(Request::CheckpointCreate { name }) => match target.checkpoint_create(&name) {
            Ok(info) => json!({ "ok": true, "checkpoint": info }),
            Err(e) => json!({ "ok": false, "error": crate::cli::error_chain(&e) }),
        },
        Ok(Request::CheckpointList) => match target.checkpoint_list() {
            Ok(list) => json!({ "ok": true, "checkpoints": list }),
            Err(e) => json!({ "ok": false, "error": crate::cli::error_chain(&e) }),
        },
    };
    reply.to_string()
}

/// Live checkpoints of a disk whose writers all pass through `gate`.
pub struct DiskTarget {
    disk: Arc<Mutex<Disk>>,
    gate: Arc<Gate>,
    /// False when serving a read-only view: there is no live Now to checkpoint.
    writable: bool,
    drain_timeout: Duration,
}

impl DiskTarget {
    /// How long a checkpoint waits for in-flight I/O before giving up.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn new(disk: Arc<Mutex<Disk>>, gate: Arc<Gate>, writable: bool) -> DiskTarget {
        DiskTarget {
            disk,
            gate,
            writable,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Disk>> {
        // A panic while holding the disk may have left it half-changed: refuse to go on.
        self.disk.lock().map_err(|_| {
            Error::Protocol("internal error: the disk state was lost to a panic".into())
        })
    }
}

impl Target for DiskTarget {
    fn checkpoint_create(&self, name: &str) -> Result<CheckpointInfo> {
        if !self.writable {
            return Err(Error::Usage(
                "this server exports a read-only view; live checkpoints need Now".into(),
            ));
        }
        journal::validate_name(name)?;
        let start = std::time::Instant::now();
        let paused = self.gate.pause(self.drain_timeout)?;
        let drained = start.elapsed();
        let info = self.lock()?.checkpoint(name)?;
        drop(paused);
        tracing::info!(
            "checkpoint {name:?}: I/O paused for {:?} (drain {drained:?})",
            start.elapsed()
        );
        Ok(info)
    }

    fn checkpoint_list(&self) -> Result<Vec<CheckpointInfo>> {
        Ok(self.lock()?.list())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that records calls.
    pub(crate) struct Fake {
        pub created: Mutex<Vec<String>>,
    }

    fn info(name: &str) -> CheckpointInfo {
        CheckpointInfo {
            id: 1,
            name: name.into(),
            parent: None,
            created: 5,
            layer_bytes: 4096,
            now_parent: true,
        }
    }

    impl Target for Fake {
        fn checkpoint_create(&self, name: &str) -> Result<CheckpointInfo> {
            if name == "dup" {
                return Err(journal::Error::DuplicateName(name.into()).into());
            }
            self.created.lock().unwrap().push(name.into());
            Ok(info(name))
        }
        fn checkpoint_list(&self) -> Result<Vec<CheckpointInfo>> {
            Ok(self
                .created
                .lock()
                .unwrap()
                .iter()
                .map(|n| info(n))
                .collect())
        }
    }

    pub(crate) fn fake() -> Fake {
        Fake {
            created: Mutex::new(Vec::new()),
        }
    }

    fn call(t: &dyn Target, line: &str) -> serde_json::Value {
        serde_json::from_str(&handle_line(t, line.as_bytes())).unwrap()
    }

    #[test]
    fn requests_and_replies() {
        let t = fake();
        let r = call(&t, r#"{"op":"checkpoint-create","name":"a"}"#);
        assert_eq!(r["ok"], true);
        assert_eq!(r["checkpoint"]["name"], "a");
        let r = call(&t, r#"{"op":"checkpoint-create","name":"dup"}"#);
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("already exists"));
        let r = call(&t, r#"{"op":"checkpoint-list"}"#);
        assert_eq!(r["checkpoints"].as_array().unwrap().len(), 1);
        for bad in [
            "",
            "{",
            r#"{"op":"reboot"}"#,
            r#"{"op":"checkpoint-create"}"#,
            "[1,2]",
        ] {
            let r = call(&t, bad);
            assert_eq!(r["ok"], false, "{bad}");
            assert!(r["error"].as_str().unwrap().starts_with("bad request"));
        }
        assert_eq!(*t.created.lock().unwrap(), vec!["a".to_string()]);
    }

    #[test]
    fn request_encoding() {
        let s = serde_json::to_string(&Request::CheckpointCreate { name: "x".into() }).unwrap();
        assert_eq!(s, r#"{"op":"checkpoint-create","name":"x"}"#);
        assert_eq!(
            serde_json::to_string(&Request::CheckpointList).unwrap(),
            r#"{"op":"checkpoint-list"}"#
        );
    }
}
