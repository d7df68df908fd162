//! `strata checkpoint ...` and `strata vm create`: the same verbs on a running VM or disk
//! server (through its control socket) and on a stopped VM directory (offline).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use crate::cli::{CheckpointCommand, VmCreateArgs, Where};
use crate::control::client::{call, utc};
use crate::control::{to_json, Request};
use crate::merge_progress::{format_status, Display, MergeView};
use crate::size::parse_size;
use crate::vm_ops;
use crate::vmdir::{CacheSpec, CreateOptions, NewGuest, VmDir};
use crate::{Error, Result};

/// How often `checkpoint delete --wait` asks the server how its merges are going.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Default disk size of `strata vm create`.
const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// `strata vm create`.
pub fn vm_create(args: VmCreateArgs) -> Result<ExitCode> {
    let guest = match args.kernel {
        Some(kernel) => NewGuest::Linux {
            kernel,
            initrd: args.initrd,
            cmdline: vmm::boot::linux::command_line(args.cmdline.as_deref())
                .map_err(|e| Error::Vm(crate::cli::error_chain(&e)))?,
        },
        None => {
            let spec = match &args.workload {
                Some(w) => vmm::test_guest::WorkloadSpec::parse(w)
                    .map_err(|e| Error::Usage(format!("--workload: {e}")))?,
                None => vmm::test_guest::WorkloadSpec::default(),
            };
            NewGuest::TestGuest {
                workload: spec.to_string(),
            }
        }
    };
    let opts = CreateOptions {
        memory: parse_size(&args.memory)?,
        vcpus: args.vcpus,
        cache: match args.cache {
            crate::cli::CacheArg::None => CacheSpec::None,
            crate::cli::CacheArg::Writeback => CacheSpec::Writeback,
        },
        disk_size: match &args.disk_size {
            Some(s) => parse_size(s)?,
            None => DEFAULT_DISK_SIZE,
        },
        base: args.base,
        guest,
    };
    let vm = VmDir::create(&args.dir, opts)?;
    println!(
        "VM {} created in {} ({} MiB, {} vCPU)",
        vm.spec.uuid,
        vm.path.display(),
        vm.spec.memory >> 20,
        vm.spec.vcpus
    );
    Ok(ExitCode::SUCCESS)
}

/// Where a verb goes: a control socket, or a stopped VM directory.
enum Route<'a> {
    Api(std::path::PathBuf),
    Offline(&'a Path),
}

fn route(at: &Where) -> Result<Route<'_>> {
    match (&at.api, &at.vm) {
        (Some(api), _) => Ok(Route::Api(api.clone())),
        (None, Some(dir)) => {
            let vm = VmDir::open(dir)?;
            let api = vm.api_path();
            // A running VM answers on its socket; a stale socket file refuses connections.
            if UnixStream::connect(&api).is_ok() {
                Ok(Route::Api(api))
            } else {
                Ok(Route::Offline(dir))
            }
        }
        (None, None) => Err(Error::Usage("give --api PATH or --vm DIR".into())),
    }
}

/// `strata checkpoint ...`.
pub fn run(cmd: CheckpointCommand) -> Result<ExitCode> {
    match cmd {
        CheckpointCommand::Create { at, name, memory } => {
            if let Some(m) = &memory {
                m.parse::<crate::vmdir::MemoryMode>()?;
            }
            let v = match route(&at)? {
                Route::Api(api) => {
                    call(&api, &Request::CheckpointCreate { name, memory })?["checkpoint"].take()
                }
                Route::Offline(dir) => {
                    if memory.is_some() {
                        return Err(Error::Usage(
                            "--memory: the VM is not running, so there is no memory to save (a stopped VM's checkpoint holds its disk and configuration)".into(),
                        ));
                    }
                    let vm = VmDir::open(dir)?;
                    let mut disk = vm.open_disk()?;
                    vm_ops::create_stopped(&vm, &mut disk, &name)?
                }
            };
            let got = v["name"].as_str().unwrap_or("?");
            match v.get("pause_us").and_then(Value::as_u64) {
                Some(p) => println!(
                    "checkpoint {got:?} created (machine state; guest paused {:.2} ms, complete in {:.1} ms, {} bytes of memory)",
                    p as f64 / 1000.0,
                    v["total_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    v["memory_bytes"].as_u64().unwrap_or(0)
                ),
                None => println!("checkpoint {got:?} created"),
            }
        }
        CheckpointCommand::List { at, json } => {
            let list = match route(&at)? {
                Route::Api(api) => call(&api, &Request::CheckpointList)?["checkpoints"].take(),
                Route::Offline(dir) => {
                    let vm = VmDir::open(dir)?;
                    let disk = vm.open_disk()?;
                    to_json(&vm_ops::list(&vm, &disk)?)?
                }
            };
            let empty = Vec::new();
            let items = list.as_array().unwrap_or(&empty);
            if json {
                let text = serde_json::to_string_pretty(items)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", format_tree(items));
            }
        }
        CheckpointCommand::Apply {
            at,
            name,
            save_current,
        } => {
            let v = match route(&at)? {
                Route::Api(api) => call(
                    &api,
                    &Request::CheckpointApply {
                        name: name.clone(),
                        save_current,
                    },
                )?["applied"]
                    .take(),
                Route::Offline(dir) => {
                    let mut vm = VmDir::open(dir)?;
                    let mut disk = vm.open_disk()?;
                    vm_ops::apply_stopped(&mut vm, &mut disk, &name, save_current.as_deref())?
                }
            };
            match (v["running"].as_bool(), v["resumes"].as_bool()) {
                (Some(true), _) => println!(
                    "applied {name:?}: the VM continues from it ({:.1} ms)",
                    v["apply_us"].as_u64().unwrap_or(0) as f64 / 1000.0
                ),
                (_, Some(true)) => {
                    println!("applied {name:?}: the next `strata run --vm` resumes from it")
                }
                _ => println!("applied {name:?}: its disk; the VM boots from it"),
            }
        }
        CheckpointCommand::Delete {
            at,
            name,
            subtree,
            merge,
            wait,
        } => {
            let opts = crate::merge_worker::delete_options(
                subtree,
                merge.strategy.as_deref(),
                merge.rate,
            )?;
            match route(&at)? {
                Route::Api(api) => {
                    let v = call(
                        &api,
                        &Request::CheckpointDelete {
                            name: name.clone(),
                            subtree,
                            strategy: merge.strategy.clone(),
                            rate: merge.rate,
                            wait: false,
                        },
                    )?["deleted"]
                        .take();
                    let jobs = crate::control::job_ids(&v);
                    println!(
                        "deleted {} (its merges are planned in the background as delete {}{})",
                        deleted_names(&v),
                        jobs.iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        match v["gone_us"].as_u64() {
                            Some(us) =>
                                format!(", gone from the tree in {:.1} ms", us as f64 / 1000.0),
                            None => String::new(),
                        }
                    );
                    if wait {
                        wait_for_merges(&api, &jobs)?;
                    }
                }
                Route::Offline(dir) => {
                    let vm = VmDir::open(dir)?;
                    let mut disk = vm.open_disk()?;
                    let doomed = vm_ops::prepare_delete(&vm, &disk, &name, subtree)?;
                    let (r, jobs) = disk.delete_online(&name, &opts)?;
                    vm_ops::forget_deleted(&vm, &doomed)?;
                    println!(
                        "deleted {} ({} merges to run)",
                        deleted_names(&to_json(&r)?),
                        jobs.len()
                    );
                    let mut display = crate::merge_progress::Display::new();
                    crate::merge_progress::run_offline(&mut disk, jobs, &opts, &mut display)?;
                }
            }
        }
        CheckpointCommand::Status { at, json } => {
            let v = match route(&at)? {
                Route::Api(api) => call(&api, &Request::CheckpointStatus)?,
                Route::Offline(_) => serde_json::json!({ "merges": [], "finished": [] }),
            };
            if json {
                let out = serde_json::json!({ "merges": v["merges"], "finished": v["finished"] });
                let text = serde_json::to_string_pretty(&out)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print!(
                    "{}",
                    format_status(
                        &MergeView::list(&v["merges"]),
                        &MergeView::list(&v["finished"])
                    )
                );
            }
        }
        CheckpointCommand::Rename { at, name, new_name } => {
            match route(&at)? {
                Route::Api(api) => {
                    call(
                        &api,
                        &Request::CheckpointRename {
                            name: name.clone(),
                            new_name: new_name.clone(),
                        },
                    )?;
                }
                Route::Offline(dir) => {
                    let vm = VmDir::open(dir)?;
                    let mut disk = vm.open_disk()?;
                    vm_ops::rename(&mut disk, &name, &new_name)?;
                }
            }
            println!("renamed {name:?} to {new_name:?}");
        }
        CheckpointCommand::Export { at, name, output } => {
            let v = match route(&at)? {
                Route::Api(api) => {
                    let output = if output.is_absolute() {
                        output
                    } else {
                        std::env::current_dir()
                            .map_err(|e| Error::io("current directory", e))?
                            .join(output)
                    };
                    call(
                        &api,
                        &Request::CheckpointExport {
                            name: name.clone(),
                            output,
                        },
                    )?["exported"]
                        .take()
                }
                Route::Offline(dir) => {
                    let vm = VmDir::open(dir)?;
                    let disk = vm.open_disk()?;
                    vm_ops::export(&vm, &disk, &name, &output)?
                }
            };
            println!(
                "exported {name:?} to {}{}",
                v["output"].as_str().unwrap_or("?"),
                if v["resumes"].as_bool() == Some(true) {
                    " (`strata run --vm` there resumes from it)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The names in a delete report, comma-separated.
fn deleted_names(v: &Value) -> String {
    v["deleted"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
        .unwrap_or_default()
        .join(", ")
}

/// `checkpoint delete --wait`: polls the server's merges until `jobs` have ended, showing
/// their progress; fails if one of them failed.
fn wait_for_merges(api: &Path, jobs: &[u64]) -> Result<()> {
    let mut display = Display::new();
    let mut shown_end: Vec<u64> = Vec::new();
    loop {
        let v = call(api, &Request::CheckpointStatus)?;
        let running: Vec<MergeView> = MergeView::list(&v["merges"])
            .into_iter()
            .filter(|m| m.is_of(jobs))
            .collect();
        display.update(&running);
        let empty = Vec::new();
        let mut failed = Vec::new();
        for f in v["finished"].as_array().unwrap_or(&empty) {
            let Some(m) = MergeView::list(&Value::Array(vec![f.clone()])).pop() else {
                continue;
            };
            if !m.is_of(jobs) || shown_end.contains(&m.id) {
                continue;
            }
            display.ended(&m, None);
            if let Some(r) = f.get("report").filter(|r| !r.is_null()) {
                println!(
                    "merge {}: {} bytes copied, {} bytes freed, {:.1} s",
                    m.id,
                    r["bytes_copied"].as_u64().unwrap_or(0),
                    r["bytes_freed"].as_u64().unwrap_or(0),
                    r["copy_seconds"].as_f64().unwrap_or(0.0)
                );
            }
            if m.state.starts_with("failed") {
                failed.push(m.line());
            }
            shown_end.push(m.id);
        }
        if !failed.is_empty() {
            return Err(Error::Vm(failed.join("; ")));
        }
        if running.is_empty() {
            // Ended but no longer remembered (many merges ended meanwhile) counts as ended.
            return Ok(());
        }
        std::thread::sleep(WAIT_POLL);
    }
}

/// The tree as text: one line per checkpoint, indented under its parent, Now marked.
pub fn format_tree(list: &[Value]) -> String {
    if list.is_empty() {
        return "no checkpoints\n".to_string();
    }
    let mut out = format!(
        "{:<32} {:<8} {:>12} {:>12}  {:<19}\n",
        "NAME", "KIND", "DISK BYTES", "STATE BYTES", "CREATED (UTC)"
    );
    let depth_of = |c: &Value| -> usize {
        let mut d = 0;
        let mut parent = c["parent"].as_str().map(str::to_string);
        while let Some(p) = parent {
            d += 1;
            if d > list.len() {
                break;
            }
            parent = list
                .iter()
                .find(|x| x["name"].as_str() == Some(&p))
                .and_then(|x| x["parent"].as_str().map(str::to_string));
        }
        d
    };
    for c in list {
        let name = format!(
            "{}{}",
            "  ".repeat(depth_of(c)),
            c["name"].as_str().unwrap_or("?")
        );
        let kind = c["kind"].as_str().unwrap_or("disk");
        let now = if c["now_parent"] == Value::Bool(true) {
            "  <- Now"
        } else {
            ""
        };
        out.push_str(&format!(
            "{name:<32} {kind:<8} {:>12} {:>12}  {:<19}{now}\n",
            c["layer_bytes"].as_u64().unwrap_or(0),
            c["state_bytes"].as_u64().unwrap_or(0),
            utc(c["created"].as_u64().unwrap_or(0)),
        ));
    }
    out
}
