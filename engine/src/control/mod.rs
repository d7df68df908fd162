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

use journal::Disk;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::quiesce::Gate;
use crate::{Error, Result};

pub use server::ControlServer;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Take a live checkpoint of Now (of the whole machine, on a VM).
    CheckpointCreate {
        name: String,
        /// VM memory mode: `live` (default) or `stop-copy`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory: Option<String>,
    },
    /// List the checkpoints.
    CheckpointList,
    /// Put the machine (or disk) back to a checkpoint, optionally checkpointing Now first.
    CheckpointApply {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        save_current: Option<String>,
    },
    /// Delete a checkpoint (and its descendants with `subtree`).
    CheckpointDelete {
        name: String,
        #[serde(default)]
        subtree: bool,
    },
    /// Rename a checkpoint.
    CheckpointRename { name: String, new_name: String },
    /// Write a checkpoint as a standalone VM directory.
    CheckpointExport {
        name: String,
        output: std::path::PathBuf,
    },
}

/// What the control socket acts on. Verbs a target does not have answer with a clear error.
pub trait Target: Send + Sync {
    /// Takes a checkpoint: every write acknowledged before is in it, no later write is.
    fn checkpoint_create(&self, name: &str, memory: Option<&str>) -> Result<Value>;
    /// All checkpoints, parents before children (a JSON array).
    fn checkpoint_list(&self) -> Result<Value>;
    fn checkpoint_apply(&self, _name: &str, _save_current: Option<&str>) -> Result<Value> {
        Err(unsupported("apply"))
    }
    fn checkpoint_delete(&self, _name: &str, _subtree: bool) -> Result<Value> {
        Err(unsupported("delete"))
    }
    fn checkpoint_rename(&self, _name: &str, _new_name: &str) -> Result<Value> {
        Err(unsupported("rename"))
    }
    fn checkpoint_export(&self, _name: &str, _output: &std::path::Path) -> Result<Value> {
        Err(unsupported("export"))
    }
}

fn unsupported(verb: &str) -> Error {
    Error::Usage(format!(
        "checkpoint {verb} is not available on a disk server's control socket; use `strata disk {verb}` on the stopped disk, or a VM's socket"
    ))
}

/// Answers one request line with one JSON reply (without the newline).
pub fn handle_line(target: &dyn Target, line: &[u8]) -> String {
    let result = match serde_json::from_slice::<Request>(line) {
        Err(e) => return json!({ "ok": false, "error": format!("bad request: {e}") }).to_string(),
        Ok(Request::CheckpointCreate { name, memory }) => target
            .checkpoint_create(&name, memory.as_deref())
            .map(|c| json!({ "checkpoint": c })),
        Ok(Request::CheckpointList) => target
            .checkpoint_list()
            .map(|l| json!({ "checkpoints": l })),
        Ok(Request::CheckpointApply { name, save_current }) => target
            .checkpoint_apply(&name, save_current.as_deref())
            .map(|r| json!({ "applied": r })),
        Ok(Request::CheckpointDelete { name, subtree }) => target
            .checkpoint_delete(&name, subtree)
            .map(|r| json!({ "deleted": r })),
        Ok(Request::CheckpointRename { name, new_name }) => target
            .checkpoint_rename(&name, &new_name)
            .map(|r| json!({ "renamed": r })),
        Ok(Request::CheckpointExport { name, output }) => target
            .checkpoint_export(&name, &output)
            .map(|r| json!({ "exported": r })),
    };
    let reply = match result {
        Ok(mut v) => {
            v["ok"] = Value::Bool(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": crate::cli::error_chain(&e) }),
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
    fn checkpoint_create(&self, name: &str, memory: Option<&str>) -> Result<Value> {
        if memory.is_some() {
            return Err(Error::Usage(
                "--memory is for VM checkpoints; a disk server has no memory to save".into(),
            ));
        }
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
        to_json(&info)
    }

    fn checkpoint_list(&self) -> Result<Value> {
        to_json(&self.lock()?.list())
    }

    fn checkpoint_rename(&self, name: &str, new_name: &str) -> Result<Value> {
        if !self.writable {
            return Err(Error::Usage(
                "this server exports a read-only view; rename the checkpoint with `strata disk rename`".into(),
            ));
        }
        self.lock()?.rename(name, new_name)?;
        Ok(json!({ "name": name, "new_name": new_name }))
    }
}

/// A serialisable value as JSON.
pub fn to_json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::CheckpointInfo;

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
        fn checkpoint_create(&self, name: &str, _memory: Option<&str>) -> Result<Value> {
            if name == "dup" {
                return Err(journal::Error::DuplicateName(name.into()).into());
            }
            self.created.lock().unwrap().push(name.into());
            to_json(&info(name))
        }
        fn checkpoint_list(&self) -> Result<Value> {
            let list: Vec<CheckpointInfo> = self
                .created
                .lock()
                .unwrap()
                .iter()
                .map(|n| info(n))
                .collect();
            to_json(&list)
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
        let r = call(&t, r#"{"op":"checkpoint-apply","name":"a"}"#);
        assert_eq!(r["ok"], false);
        assert!(
            r["error"].as_str().unwrap().contains("not available"),
            "{r}"
        );
        let r = call(&t, r#"{"op":"checkpoint-create","name":"b","bogus":1}"#);
        assert!(
            r["error"].as_str().unwrap().starts_with("bad request"),
            "{r}"
        );
    }

    #[test]
    fn request_encoding() {
        let s = serde_json::to_string(&Request::CheckpointCreate {
            name: "x".into(),
            memory: None,
        })
        .unwrap();
        assert_eq!(s, r#"{"op":"checkpoint-create","name":"x"}"#);
        assert_eq!(
            serde_json::to_string(&Request::CheckpointList).unwrap(),
            r#"{"op":"checkpoint-list"}"#
        );
    }
}
