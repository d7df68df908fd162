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

use crate::merge_worker::{self, MergeWorker, Waiter};
use crate::quiesce::Gate;
use crate::{Error, Result};

pub use server::ControlServer;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One control request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Delete a checkpoint (and its descendants with `subtree`): it leaves the tree at once,
    /// the data other checkpoints and Now still need is merged in the background.
    CheckpointDelete {
        name: String,
        #[serde(default)]
        subtree: bool,
        /// Merge strategy (`relink`, `compact-into-child`, `compact-into-parent`,
        /// `threshold`, `auto`); the journal's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strategy: Option<String>,
        /// Bulk-copy rate limit in MB/s (10^6 bytes); unlimited when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<f64>,
        /// Reply only once this delete's merges have ended.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
    },
    /// The merges running, queued and recently finished.
    CheckpointStatus,
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
    /// Takes the checkpoint out of the tree; the reply's `jobs` is what to wait for (the
    /// delete's id, which its merges name as their `delete`).
    fn checkpoint_delete(&self, _name: &str, _args: &DeleteArgs) -> Result<Value> {
        Err(unsupported("delete"))
    }
    /// The merge worker's status (`{"merges":[...],"finished":[...]}`).
    fn checkpoint_status(&self) -> Result<Value> {
        Err(unsupported("status"))
    }
    /// Waits for merges: what a delete with `wait` uses after it replied with its jobs.
    fn merge_waiter(&self) -> Option<Waiter> {
        None
    }
    fn checkpoint_rename(&self, _name: &str, _new_name: &str) -> Result<Value> {
        Err(unsupported("rename"))
    }
    fn checkpoint_export(&self, _name: &str, _output: &std::path::Path) -> Result<Value> {
        Err(unsupported("export"))
    }
}

/// The options of a delete request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeleteArgs {
    pub subtree: bool,
    pub strategy: Option<String>,
    /// MB/s.
    pub rate: Option<f64>,
}

impl DeleteArgs {
    /// The journal's options for these arguments (a clear error for a bad strategy or rate).
    pub fn options(&self) -> Result<journal::DeleteOptions> {
        merge_worker::delete_options(self.subtree, self.strategy.as_deref(), self.rate)
    }
}

fn unsupported(verb: &str) -> Error {
    Error::Usage(format!(
        "checkpoint {verb} is not available on a disk server's control socket; use `strata disk {verb}` on the stopped disk, or a VM's socket"
    ))
}

/// The answer to one request: ready now, or computed later (a delete that waits for its
/// merges) on a thread of its own so the socket keeps serving other clients.
pub enum Answer {
    Now(String),
    Later(Box<dyn FnOnce() -> String + Send>),
}

/// Answers one request line with one JSON reply (without the newline), waiting for it if it
/// takes a while.
pub fn handle_line(target: &dyn Target, line: &[u8]) -> String {
    match handle_request(target, line) {
        Answer::Now(s) => s,
        Answer::Later(f) => f(),
    }
}

fn reply(result: Result<Value>) -> String {
    let reply = match result {
        Ok(mut v) => {
            v["ok"] = Value::Bool(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": crate::cli::error_chain(&e) }),
    };
    reply.to_string()
}

/// Answers one request line.
pub fn handle_request(target: &dyn Target, line: &[u8]) -> Answer {
    let result = match serde_json::from_slice::<Request>(line) {
        Err(e) => {
            return Answer::Now(
                json!({ "ok": false, "error": format!("bad request: {e}") }).to_string(),
            )
        }
        Ok(Request::CheckpointCreate { name, memory }) => target
            .checkpoint_create(&name, memory.as_deref())
            .map(|c| json!({ "checkpoint": c })),
        Ok(Request::CheckpointList) => target
            .checkpoint_list()
            .map(|l| json!({ "checkpoints": l })),
        Ok(Request::CheckpointApply { name, save_current }) => target
            .checkpoint_apply(&name, save_current.as_deref())
            .map(|r| json!({ "applied": r })),
        Ok(Request::CheckpointDelete {
            name,
            subtree,
            strategy,
            rate,
            wait,
        }) => {
            let args = DeleteArgs {
                subtree,
                strategy,
                rate,
            };
            let waiter = if wait { target.merge_waiter() } else { None };
            let r = args
                .options()
                .and_then(|_| target.checkpoint_delete(&name, &args));
            match (r, waiter) {
                (Ok(deleted), Some(waiter)) => {
                    return Answer::Later(Box::new(move || {
                        let ids = job_ids(&deleted);
                        reply(waiter.wait(&ids).and_then(|done| {
                            Ok(json!({ "deleted": deleted, "merges": to_json(&done)? }))
                        }))
                    }))
                }
                (r, _) => r.map(|r| json!({ "deleted": r })),
            }
        }
        Ok(Request::CheckpointStatus) => target.checkpoint_status(),
        Ok(Request::CheckpointRename { name, new_name }) => target
            .checkpoint_rename(&name, &new_name)
            .map(|r| json!({ "renamed": r })),
        Ok(Request::CheckpointExport { name, output }) => target
            .checkpoint_export(&name, &output)
            .map(|r| json!({ "exported": r })),
    };
    Answer::Now(reply(result))
}

/// The merge ids in a delete reply.
pub fn job_ids(deleted: &Value) -> Vec<u64> {
    deleted["jobs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Live checkpoints of a disk whose writers all pass through `gate`.
pub struct DiskTarget {
    disk: Arc<Mutex<Disk>>,
    gate: Arc<Gate>,
    /// False when serving a read-only view: there is no live Now to checkpoint.
    writable: bool,
    drain_timeout: Duration,
    /// The background merges of online deletes (writable disks only), or why its thread
    /// could not start (the disk is still served; deletes report the reason).
    merges: Option<std::result::Result<MergeWorker, String>>,
}

impl DiskTarget {
    /// How long a checkpoint waits for in-flight I/O before giving up.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    /// A target for `disk`; a writable one starts the disk's merge worker, which resumes
    /// merges an earlier run left unfinished.
    pub fn new(disk: Arc<Mutex<Disk>>, gate: Arc<Gate>, writable: bool) -> DiskTarget {
        let merges = writable.then(|| {
            MergeWorker::start(disk.clone(), gate.clone()).map_err(|e| {
                let why = crate::cli::error_chain(&e);
                tracing::error!("no online merges on this server: {why}");
                why
            })
        });
        DiskTarget {
            disk,
            gate,
            writable,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
            merges,
        }
    }

    fn worker(&self, verb: &str) -> Result<&MergeWorker> {
        match &self.merges {
            Some(Ok(w)) => Ok(w),
            Some(Err(why)) => Err(Error::Usage(format!(
                "the merge worker did not start ({why}); use `strata disk {verb}` on the stopped disk"
            ))),
            None => Err(Error::Usage(format!(
                "this server exports a read-only view; checkpoint {verb} needs the server of Now (or `strata disk {verb}` on the stopped disk)"
            ))),
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
        // Now's committed writes are made durable before I/O is paused, so that the sync
        // `Disk::checkpoint` does with I/O paused has only the last moment's writes left. That
        // sync also frees the blocks the synced writes superseded, one hole punch each (on this
        // machine's ext4, mounted with `discard`, a synchronous discard of 10-60 ms holding the
        // file's locks): after an fio fill of 32 MiB of random 4 KiB writes, 4.6 s of punches
        // inside the pause (strace). Here, with I/O running, they slow the clients instead of
        // stopping them. (Not done before a delete or a merge's swap: their syncs inside the
        // pause were measured cheap, and a sync before them moved punches into the merge, fg
        // IOPS 0.53-0.65x instead of 0.87-1.10x.) A failure is reported by the next sync.
        let now = self.lock()?.now();
        if let Err(e) = now.sync_log(true) {
            tracing::debug!("sync of Now before a checkpoint: {e}");
        }
        // The disk first, then the gate, like every controller (see `MergeWorker::delete`).
        let mut disk = self.lock()?;
        let start = std::time::Instant::now();
        let paused = self.gate.pause(self.drain_timeout)?;
        let drained = start.elapsed();
        let info = disk.checkpoint(name)?;
        drop(paused);
        drop(disk);
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

    fn checkpoint_delete(&self, name: &str, args: &DeleteArgs) -> Result<Value> {
        let worker = self.worker("delete")?;
        let opts = args.options()?;
        to_json(&worker.delete(name, &opts, self.drain_timeout)?)
    }

    fn checkpoint_status(&self) -> Result<Value> {
        match &self.merges {
            None => to_json(&merge_worker::WorkerStatus::default()),
            Some(_) => to_json(&self.worker("status")?.status()),
        }
    }

    fn merge_waiter(&self) -> Option<Waiter> {
        self.worker("delete").ok().map(MergeWorker::waiter)
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
