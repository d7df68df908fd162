//! The checkpoint verbs on a VM directory (Hyper-V's Checkpoint-VM, Get-VMSnapshot,
//! Restore-VMSnapshot, Remove-VMSnapshot, Rename-VMSnapshot, Export-VMSnapshot), shared by a
//! stopped VM (`--vm DIR`) and a running one (its control socket, `vm_live.rs`). What needs the
//! running machine (capturing it, replacing it) lives in `vm_live.rs`; this module holds the
//! disk-and-state bookkeeping both use.

use std::path::{Path, PathBuf};

use journal::{CheckpointInfo, Disk};
use serde::Serialize;
use serde_json::{json, Value};

use crate::control::to_json;
use crate::machine;
use crate::vmdir::{files, store, MachineMeta, StateMeta, VmDir};
use crate::{Error, Result};

/// One checkpoint as listed: the disk checkpoint and what else it holds.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub disk: CheckpointInfo,
    /// `machine` (running VM: vCPUs, devices, memory, disk), `stopped` (disk and configuration
    /// of a stopped VM) or `disk` (a disk checkpoint taken with `strata disk checkpoint`).
    pub kind: &'static str,
    /// Host bytes of its state files (configuration, machine state, memory image).
    pub state_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineMeta>,
}

/// The tree, parents first.
pub fn list(vm: &VmDir, disk: &Disk) -> Result<Vec<Listed>> {
    disk.list()
        .into_iter()
        .map(|c| {
            let meta = vm.store.meta(c.id)?;
            let (kind, machine) = match meta {
                Some(StateMeta {
                    machine: Some(m), ..
                }) => ("machine", Some(m)),
                Some(_) => ("stopped", None),
                None => ("disk", None),
            };
            Ok(Listed {
                state_bytes: vm.store.bytes_of(c.id),
                disk: c,
                kind,
                machine,
            })
        })
        .collect()
}

/// Checkpoint of a stopped VM: the disk and the configuration.
pub fn create_stopped(vm: &VmDir, disk: &mut Disk, name: &str) -> Result<Value> {
    journal::validate_name(name)?;
    if disk.list().iter().any(|c| c.name == name) {
        return Err(journal::Error::DuplicateName(name.into()).into());
    }
    let draft = vm.store.begin(name)?;
    let info = disk.checkpoint(name)?;
    let meta = StateMeta {
        format: 1,
        checkpoint: info.id,
        machine: None,
    };
    if let Err(e) = draft.commit(&vm.spec, &meta) {
        undo_checkpoint(disk, name);
        return Err(e);
    }
    to_json(&info)
}

/// Removes a disk checkpoint whose state could not be completed (Now reads as before).
pub fn undo_checkpoint(disk: &mut Disk, name: &str) {
    if let Err(e) = disk.delete(name, false) {
        tracing::error!("removing incomplete checkpoint {name:?}: {e}");
    }
}

/// What applying a checkpoint leaves the machine as.
pub struct Applied {
    pub id: u64,
    /// The checkpoint saved a running machine: resume it.
    pub machine: bool,
}

/// Makes the disk's Now a fresh child of `name` and the configuration the checkpoint's.
/// (`save_current` must already have been taken by the caller.)
pub fn apply_disk(vm: &mut VmDir, disk: &mut Disk, name: &str) -> Result<Applied> {
    let id = find(disk, name)?.id;
    let meta = vm.store.meta(id)?;
    let machine = matches!(
        meta,
        Some(StateMeta {
            machine: Some(_),
            ..
        })
    );
    if machine {
        // Refuse before changing anything if the state cannot be restored.
        machine::check_memory(&vm.store.memory_chain(id)?, &vm.spec)?;
        machine::check_state_file(&vm.store.dir_of(id).join(store::STATE_FILE), &vm.spec)?;
    }
    let spec = match meta {
        Some(_) => Some(vm.store.config(id)?),
        None => None,
    };
    disk.apply(name, None)?;
    if let Some(spec) = spec {
        vm.set_spec(spec)?;
    }
    Ok(Applied { id, machine })
}

/// `apply` on a stopped VM: the next `strata run --vm` resumes from the checkpoint (or cold
/// boots its disk, for a checkpoint without a saved machine).
pub fn apply_stopped(
    vm: &mut VmDir,
    disk: &mut Disk,
    name: &str,
    save_current: Option<&str>,
) -> Result<Value> {
    find(disk, name)?;
    if let Some(sc) = save_current {
        create_stopped(vm, disk, sc)?;
    }
    let applied = apply_disk(vm, disk, name)?;
    vm.store.set_resume(applied.machine.then_some(applied.id))?;
    Ok(json!({ "name": name, "resumes": applied.machine }))
}

/// Deletes `name` (with `subtree`, its descendants too). Memory images that are increments
/// over a deleted checkpoint's image first absorb its pages, so every remaining checkpoint
/// restores exactly as before.
pub fn delete(vm: &VmDir, disk: &mut Disk, name: &str, subtree: bool) -> Result<Value> {
    let doomed = prepare_delete(vm, disk, name, subtree)?;
    let report = disk.delete(name, subtree)?;
    forget_deleted(vm, &doomed)?;
    to_json(&report)
}

/// The memory half of a delete, done before the disk's tree changes: folds every surviving
/// memory image that is an increment over a doomed checkpoint's image. Returns the ids of
/// the doomed checkpoints. A fold is valid on its own (the child's image then holds the
/// union), so a delete that fails after it leaves every checkpoint restorable.
pub fn prepare_delete(vm: &VmDir, disk: &Disk, name: &str, subtree: bool) -> Result<Vec<u64>> {
    let target = find(disk, name)?;
    let all = disk.list();
    let mut doomed = vec![target.id];
    if subtree {
        let mut i = 0;
        while i < doomed.len() {
            let parent = all
                .iter()
                .find(|c| c.id == doomed[i])
                .map(|c| c.name.clone());
            for c in &all {
                if c.parent.is_some() && c.parent == parent && !doomed.contains(&c.id) {
                    doomed.push(c.id);
                }
            }
            i += 1;
        }
    }
    // Fold until no surviving image is an increment over a doomed one.
    loop {
        let mut folded = false;
        for &d in &doomed {
            for child in vm.store.memory_children(d)? {
                if !doomed.contains(&child) {
                    fold_into_child(vm, d, child)?;
                    folded = true;
                }
            }
        }
        if !folded {
            break;
        }
    }
    Ok(doomed)
}

/// The state half of a delete, once the disk's tree no longer has the checkpoints: removes
/// their saved state and forgets a resume point among them.
pub fn forget_deleted(vm: &VmDir, doomed: &[u64]) -> Result<()> {
    for d in doomed {
        vm.store.remove(*d)?;
    }
    if let Some(r) = vm.store.resume()? {
        if doomed.contains(&r) {
            vm.store.set_resume(None)?;
        }
    }
    Ok(())
}

/// Folds checkpoint `parent`'s memory image into `child`'s increment: the child's image then
/// holds the union (its own pages win) and is an increment over the parent's parent (or full).
fn fold_into_child(vm: &VmDir, parent: u64, child: u64) -> Result<()> {
    let pmeta = vm
        .store
        .meta(parent)?
        .and_then(|m| m.machine)
        .ok_or_else(|| Error::Vm(format!("checkpoint {parent} has no memory image to fold")))?;
    let mut cmeta = vm
        .store
        .meta(child)?
        .ok_or_else(|| Error::Vm(format!("checkpoint {child} has no saved state")))?;
    let Some(cm) = cmeta.machine.as_mut() else {
        return Ok(());
    };
    let pimg = vm.store.dir_of(parent).join(store::MEMORY_FILE);
    let cimg = vm.store.dir_of(child).join(store::MEMORY_FILE);
    let bytes = machine::fold(&pimg, &cimg, &vm.spec)?;
    cm.memory_parent = pmeta.memory_parent;
    cm.memory_bytes = bytes;
    vm.store.rewrite_meta(&cmeta)
}

/// Renames a checkpoint (its state is kept by id).
pub fn rename(disk: &mut Disk, name: &str, new_name: &str) -> Result<Value> {
    disk.rename(name, new_name)?;
    Ok(json!({ "name": name, "new_name": new_name }))
}

/// Writes checkpoint `name` as a standalone VM directory at `out`: the same configuration
/// and identity, a flattened disk (no base, no history) holding one checkpoint of that name
/// with Now a fresh child, the machine state, and one full memory image. `strata run --vm OUT`
/// resumes from that instant.
pub fn export(vm: &VmDir, disk: &Disk, name: &str, out: &Path) -> Result<Value> {
    let id = find(disk, name)?.id;
    refuse_inside(out, &vm.path)?;
    let meta = vm.store.meta(id)?;
    let spec = match &meta {
        Some(_) => vm.store.config(id)?,
        None => vm.spec.clone(),
    };
    let out_abs = absolute(out)?;
    let tmp = out_abs.with_file_name(format!(
        ".{}.strata-export-{}",
        out_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if out.exists() {
        return Err(Error::Usage(format!("{} already exists", out.display())));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        for (i, src) in guest_files(vm, &spec) {
            files::copy_capped(&src, &tmp.join(i), 1 << 30)?;
        }
        spec.save(&tmp.join(crate::vmdir::SPEC_FILE))?;
        let view = disk.checkpoint_view(name)?;
        let new_disk_dir = tmp.join(crate::vmdir::DISK_DIR);
        Disk::create(&new_disk_dir, view.size(), None)?;
        let mut new_disk = Disk::open(
            &new_disk_dir,
            journal::OpenOptions {
                cache: journal::CacheMode::Writeback,
                read_only: false,
            },
        )?;
        copy_view(&view, &new_disk.now())?;
        let info = new_disk.checkpoint(name)?;
        let new_vm = VmDir::open(&tmp)?;
        let draft = new_vm.store.begin(name)?;
        let machine = match meta.and_then(|m| m.machine) {
            Some(m) => {
                let chain = vm.store.memory_chain(id)?;
                files::copy_capped(
                    &vm.store.dir_of(id).join(store::STATE_FILE),
                    &draft.dir().join(store::STATE_FILE),
                    64 << 20,
                )?;
                let bytes = machine::flatten(&chain, &draft.dir().join(store::MEMORY_FILE), &spec)?;
                Some(MachineMeta {
                    memory_parent: None,
                    memory_bytes: bytes,
                    ..m
                })
            }
            None => None,
        };
        let has_machine = machine.is_some();
        draft.commit(
            &spec,
            &StateMeta {
                format: 1,
                checkpoint: info.id,
                machine,
            },
        )?;
        new_vm.store.set_resume(has_machine.then_some(info.id))?;
        drop(new_disk);
        files::sync_dir(&tmp)?;
        std::fs::rename(&tmp, &out_abs)
            .map_err(|e| Error::io(format!("renaming to {}", out.display()), e))?;
        Ok(json!({ "name": name, "output": out_abs, "resumes": has_machine }))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The guest files named by `spec` (output name, source path).
fn guest_files(vm: &VmDir, spec: &crate::vmdir::VmSpec) -> Vec<(PathBuf, PathBuf)> {
    match &spec.guest {
        crate::vmdir::GuestSpec::Linux { kernel, initrd, .. } => std::iter::once(kernel)
            .chain(initrd.iter())
            .map(|f| (f.clone(), vm.guest_file(f)))
            .collect(),
        crate::vmdir::GuestSpec::TestGuest { .. } => Vec::new(),
    }
}

/// Copies every non-zero block of `from` into `to` (a fresh disk's Now), then flushes.
fn copy_view(from: &journal::Volume, to: &journal::Volume) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    const BLOCK: usize = journal::BLOCK_SIZE as usize;
    let mut buf = journal::AlignedBuf::new(CHUNK);
    let size = from.size();
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        let chunk = &mut buf.as_mut_slice()[..n];
        from.read_at(chunk, off)?;
        let mut b = 0;
        while b < n {
            let end = (b + BLOCK).min(n);
            if chunk[b..end].iter().any(|&x| x != 0) {
                let mut run_end = end;
                while run_end < n
                    && chunk[run_end..(run_end + BLOCK).min(n)]
                        .iter()
                        .any(|&x| x != 0)
                {
                    run_end = (run_end + BLOCK).min(n);
                }
                to.write_at(&chunk[b..run_end], off + b as u64, false)?;
                b = run_end;
            } else {
                b = end;
            }
        }
        off += n as u64;
    }
    to.flush()?;
    Ok(())
}

fn find(disk: &Disk, name: &str) -> Result<CheckpointInfo> {
    disk.list()
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| journal::Error::UnknownCheckpoint(name.into()).into())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
    Ok(cwd.join(p))
}

/// Refuses an output inside the VM directory (or the VM directory itself).
fn refuse_inside(out: &Path, vm_dir: &Path) -> Result<()> {
    let out = absolute(out)?;
    let vm = std::fs::canonicalize(vm_dir)
        .map_err(|e| Error::io(format!("resolving {}", vm_dir.display()), e))?;
    // The output does not exist yet: resolve its nearest existing ancestor.
    let mut probe = out.clone();
    let mut rest = Vec::new();
    while !probe.exists() {
        match (probe.file_name(), probe.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n.to_owned());
                probe = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = std::fs::canonicalize(&probe).unwrap_or(probe);
    for n in rest.iter().rev() {
        resolved.push(n);
    }
    if resolved.starts_with(&vm) || vm.starts_with(&resolved) {
        return Err(Error::Usage(format!(
            "the export output {} must be outside the VM directory {}",
            out.display(),
            vm.display()
        )));
    }
    Ok(())
}
