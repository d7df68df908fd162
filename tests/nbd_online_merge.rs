//! Online deletes of a disk served over NBD: a client keeps writing, zeroing, discarding and
//! flushing through a real NBD connection while checkpoints are created and deleted through
//! the control socket with each merge strategy. After each delete's merges finish, every
//! checkpoint (exported while the server runs, or served read-only by a second server and
//! compared by `qemu-img compare`) and Now (read through NBD) must equal an in-memory model.
//! The server is also SIGKILLed at random moments of merges and restarted: everything still
//! equals the model and `strata disk check` is clean.

mod nbd_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd_common::fallible_client::{NbdClient, CMD_TRIM, CMD_WRITE_ZEROES, FLAG_FUA};
use nbd_common::{require_tool, run_ok, run_strata, strata, Server};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const SIZE: usize = 16 << 20;
const SECTOR: usize = 512;

/// A write that was sent but whose reply never came (the server was killed): afterwards each
/// sector of it holds either the old or the new bytes.
struct Pending {
    offset: usize,
    data: Vec<u8>,
}

/// A client writing random data through NBD and keeping the model of Now. It holds the model's
/// lock for each request, so whoever takes the lock stops it between two requests.
struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Option<Pending>, u64)>,
}

impl Load {
    fn start(sock: &Path, model: Arc<Mutex<Vec<u8>>>, seed: u64, all_fua: bool) -> Load {
        let mut c = NbdClient::connect(sock).expect("connect the load client");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut ops = 0u64;
            while !st.load(Ordering::SeqCst) {
                let mut m = model.lock().unwrap();
                let op = rng.gen_range(0..100);
                let fua = all_fua || rng.gen_ratio(1, 10);
                let flags = if fua { FLAG_FUA } else { 0 };
                let (offset, new, sent) = if op < 70 {
                    // Mostly whole 4 KiB blocks, sometimes single sectors.
                    let (len, align) = if rng.gen_ratio(1, 4) {
                        (SECTOR * rng.gen_range(1..=16), SECTOR)
                    } else {
                        (4096 * rng.gen_range(1..=16), 4096)
                    };
                    let off = align * rng.gen_range(0..(SIZE - len) / align);
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    let r = c.write(off as u64, &data, fua);
                    (off, data, r)
                } else if op < 90 {
                    let len = 4096 * rng.gen_range(1..=64);
                    let off = 4096 * rng.gen_range(0..(SIZE - len) / 4096);
                    let cmd = if op < 80 { CMD_TRIM } else { CMD_WRITE_ZEROES };
                    let r = c
                        .request(cmd, flags, off as u64, len as u32, &[])
                        .map(|(e, _)| e);
                    (off, vec![0u8; len], r)
                } else {
                    match c.flush() {
                        Ok(0) => {
                            ops += 1;
                            continue;
                        }
                        Ok(e) => panic!("flush failed with NBD error {e}"),
                        Err(_) => return (None, ops),
                    }
                };
                match sent {
                    Ok(0) => m[offset..offset + new.len()].copy_from_slice(&new),
                    Ok(e) => panic!("request at {offset} failed with NBD error {e}"),
                    Err(_) => return (Some(Pending { offset, data: new }), ops),
                }
                ops += 1;
                drop(m);
                // Let the controller take the model between requests.
                std::thread::yield_now();
            }
            c.disconnect();
            (None, ops)
        });
        Load { stop, thread }
    }

    /// Stops the client (or collects it after the server died).
    fn finish(self) -> (Option<Pending>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the load thread panicked")
    }
}

/// A served disk, its model, and the checkpoints' expected contents.
struct Rig {
    dir: tempfile::TempDir,
    disk: PathBuf,
    server: Option<Server>,
    now: Arc<Mutex<Vec<u8>>>,
    checkpoints: BTreeMap<String, Vec<u8>>,
    load: Option<Load>,
    seed: u64,
    /// Milliseconds each delete took until the checkpoint was gone (from the server's reply).
    gone_ms: Vec<f64>,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let disk = nbd_common::create_disk(dir.path(), "disk", "16M");
        Rig {
            dir,
            disk,
            server: None,
            now: Arc::new(Mutex::new(vec![0u8; SIZE])),
            checkpoints: BTreeMap::new(),
            load: None,
            seed,
            gone_ms: Vec::new(),
        }
    }

    fn api(&self) -> String {
        self.server.as_ref().unwrap().api.display().to_string()
    }

    fn start_server(&mut self) {
        self.server = Some(Server::start(&self.disk, self.dir.path(), &[]));
    }

    fn start_load(&mut self, all_fua: bool) {
        self.seed += 1;
        let sock = self.server.as_ref().unwrap().sock.clone();
        self.load = Some(Load::start(&sock, self.now.clone(), self.seed, all_fua));
    }

    fn stop_load(&mut self) -> Option<Pending> {
        let (pending, ops) = self.load.take().map(Load::finish).unwrap_or((None, 0));
        eprintln!("load: {ops} requests");
        pending
    }

    /// A live checkpoint holding exactly the requests acknowledged before it.
    fn checkpoint(&mut self, name: &str) {
        let now = self.now.lock().unwrap();
        let api = self.api();
        run_ok(strata(&[
            "checkpoint",
            "create",
            "--api",
            &api,
            "--name",
            name,
        ]));
        self.checkpoints.insert(name.to_string(), now.clone());
    }

    /// Lets the load run for a while.
    fn run_load(&self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// Deletes `name` online; it must be gone from the list when the command returns.
    fn delete(&mut self, name: &str, strategy: &str, rate: &str) -> Vec<u64> {
        let api = self.api();
        let out = run_ok(strata(&[
            "checkpoint",
            "delete",
            "--api",
            &api,
            name,
            "--strategy",
            strategy,
            "--rate",
            rate,
        ]));
        assert!(out.contains(&format!("deleted {name}")), "{out}");
        let listed = self.list();
        assert!(
            !listed.contains(&name.to_string()),
            "{name} still listed after delete returned: {listed:?}"
        );
        self.checkpoints.remove(name);
        if let Some(ms) = out
            .split("gone from the tree in ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            self.gone_ms.push(ms);
        }
        self.status()["merges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["checkpoint"] == name)
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    }

    fn list(&self) -> Vec<String> {
        let out = run_ok(strata(&[
            "checkpoint",
            "list",
            "--api",
            &self.api(),
            "--json",
        ]));
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn status(&self) -> Value {
        let out = run_ok(strata(&[
            "checkpoint",
            "status",
            "--api",
            &self.api(),
            "--json",
        ]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// Waits until no merge runs or waits; fails on a failed merge.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = self.status();
            for f in s["finished"].as_array().unwrap() {
                let state = f["status"]["state"].as_str().unwrap();
                assert!(!state.starts_with("failed"), "a merge failed: {f}");
            }
            if s["merges"].as_array().unwrap().is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "merges never finished: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every checkpoint (exported while the disk is served) and Now (read through NBD, the
    /// load stopped meanwhile) equal the model.
    fn verify(&self, when: &str) {
        let listed = self.list();
        let expected: Vec<String> = self.checkpoints.keys().cloned().collect();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "{when}: checkpoints");
        for (name, want) in &self.checkpoints {
            let out = self.dir.path().join(format!("{name}.raw"));
            run_ok(
                strata(&["disk", "export"])
                    .arg(&self.disk)
                    .arg(name)
                    .arg("--output")
                    .arg(&out),
            );
            let got = std::fs::read(&out).unwrap();
            assert_same(&got, want, &format!("{when}: checkpoint {name}"));
            std::fs::remove_file(&out).unwrap();
        }
        let now = self.now.lock().unwrap();
        let mut c = NbdClient::connect(&self.server.as_ref().unwrap().sock).unwrap();
        let mut got = Vec::with_capacity(SIZE);
        for off in (0..SIZE).step_by(1 << 20) {
            got.extend(c.read(off as u64, 1 << 20).unwrap().expect("read Now"));
        }
        c.disconnect();
        assert_same(&got, &now, &format!("{when}: Now"));
    }

    fn kill_server(&mut self) {
        self.server.take().unwrap().kill();
    }

    fn stop_server(&mut self) {
        self.server.take().unwrap().stop();
    }

    /// After a crash: the interrupted request's sectors each hold the old or the new bytes;
    /// the model takes what is there.
    fn resolve(&mut self, pending: Option<Pending>) {
        let Some(p) = pending else { return };
        let mut c = NbdClient::connect(&self.server.as_ref().unwrap().sock).unwrap();
        let got = c
            .read(p.offset as u64, p.data.len() as u32)
            .unwrap()
            .expect("read the interrupted range");
        c.disconnect();
        let mut now = self.now.lock().unwrap();
        for (i, (g, new)) in got.chunks(SECTOR).zip(p.data.chunks(SECTOR)).enumerate() {
            let at = p.offset + i * SECTOR;
            let old = &now[at..at + SECTOR];
            assert!(
                g == old || g == new,
                "sector at {at} of the interrupted request is neither old nor new"
            );
        }
        now[p.offset..p.offset + got.len()].copy_from_slice(&got);
    }

    fn check_clean(&self) {
        let (rc, out, err) = run_strata(&["disk", "check", self.disk.to_str().unwrap()]);
        assert_eq!(rc, 0, "disk check: {out}{err}");
        assert!(out.contains("clean"), "{out}");
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if got != want {
        let bad: Vec<usize> = got
            .chunks(4096)
            .zip(want.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i * 4096)
            .collect();
        panic!(
            "{what}: {} blocks differ from the model, first at byte {}",
            bad.len(),
            bad[0]
        );
    }
}

/// Checkpoints a0..a4 under load, then deletes three of them online with `strategy` (one at a
/// time, each verified after its merges), creating new ones in between.
fn model_test(strategy: &str, seed: u64) {
    let mut r = Rig::new(seed);
    r.start_server();
    r.start_load(false);
    for i in 0..5 {
        r.run_load(150);
        r.checkpoint(&format!("a{i}"));
    }
    r.run_load(150);
    let mut rng = SmallRng::seed_from_u64(seed);
    for round in 0..3 {
        let names: Vec<String> = r.checkpoints.keys().cloned().collect();
        let victim = names[rng.gen_range(0..names.len())].clone();
        // The load goes on during the delete and its merges.
        r.delete(&victim, strategy, "16");
        r.run_load(100);
        r.wait_idle();
        r.verify(&format!(
            "{strategy} round {round}, after deleting {victim}"
        ));
        r.checkpoint(&format!("b{round}"));
        r.run_load(100);
    }
    r.stop_load();
    r.verify(&format!("{strategy}: at the end"));
    r.stop_server();
    r.check_clean();
    eprintln!("{strategy}: gone from the tree after {:?} ms", r.gone_ms);
    assert!(!r.gone_ms.is_empty(), "the delete reply carries its time");
}

#[test]
fn online_delete_relink_matches_the_model() {
    model_test("relink", 1);
}

#[test]
fn online_delete_compact_into_child_matches_the_model() {
    model_test("compact-into-child", 2);
}

#[test]
fn online_delete_compact_into_parent_matches_the_model() {
    model_test("compact-into-parent", 3);
}

#[test]
fn online_delete_threshold_matches_the_model() {
    model_test("threshold", 4);
}

#[test]
fn online_delete_auto_matches_the_model() {
    model_test("auto", 5);
}

/// A second delete while a merge runs is queued behind it; both end correct, and
/// `--wait` returns only when its merges are done. A checkpoint served read-only by a second
/// server compares equal to the model with `qemu-img compare`.
#[test]
fn second_delete_is_queued_and_wait_waits() {
    require_tool("qemu-img", "qemu-utils");
    let mut r = Rig::new(40);
    r.start_server();
    // Big sequential data in each checkpoint so its merge takes a while at 2 MB/s.
    {
        let sock = r.server.as_ref().unwrap().sock.clone();
        let mut c = NbdClient::connect(&sock).unwrap();
        let mut rng = SmallRng::seed_from_u64(41);
        for i in 0..4usize {
            let region = i * (4 << 20);
            let mut data = vec![0u8; 4 << 20];
            rng.fill_bytes(&mut data);
            for (k, chunk) in data.chunks(1 << 20).enumerate() {
                let off = region + (k << 20);
                assert_eq!(c.write(off as u64, chunk, false).unwrap(), 0);
            }
            r.now.lock().unwrap()[region..region + (4 << 20)].copy_from_slice(&data);
            r.checkpoint(&format!("c{i}"));
        }
        c.disconnect();
    }
    r.start_load(false);
    r.run_load(100);
    // c0 merges into c1's stack, c2 into c3's: two independent merges, the second queued.
    let first = r.delete("c0", "compact-into-child", "2");
    let second = r.delete("c2", "compact-into-child", "2");
    let s = r.status();
    let merges = s["merges"].as_array().unwrap();
    eprintln!("status with two deletes: {s}");
    assert!(
        !first.is_empty() && !second.is_empty(),
        "compact-into-child queued no merge: {s}"
    );
    let pos = |id: u64| merges.iter().position(|m| m["id"] == id).unwrap();
    assert!(
        pos(first[0]) < pos(second[0]),
        "the second delete runs before the first: {s}"
    );
    assert_eq!(merges[pos(second[0])]["state"], "queued", "{s}");
    // The text form shows the same merges.
    let text = run_ok(strata(&["checkpoint", "status", "--api", &r.api()]));
    assert!(
        text.contains("CHECKPOINT") || text.contains("no merges"),
        "{text}"
    );
    r.wait_idle();
    r.verify("after two overlapping deletes");

    // --wait: the command returns once its merges ended, with their reports.
    r.checkpoint("c4");
    r.run_load(200);
    let api = r.api();
    let out = strata(&[
        "checkpoint",
        "delete",
        "--api",
        &api,
        "c1",
        "--strategy",
        "compact-into-child",
        "--rate",
        "4",
        "--wait",
    ])
    .output()
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    r.checkpoints.remove("c1");
    assert!(stdout.contains("merge "), "no merge report: {stdout}");
    let s = r.status();
    assert!(
        s["merges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["checkpoint"] != "c1"),
        "--wait returned while c1's merges still run: {s}"
    );
    // Not a terminal: plain progress lines on stderr.
    assert!(
        stderr.contains("merge ") && !stderr.contains('\r'),
        "no plain progress lines: {stderr}"
    );
    r.verify("after delete --wait");

    // A checkpoint served read-only by a second server, compared with qemu-img.
    let want = r.dir.path().join("c4.model");
    std::fs::write(&want, &r.checkpoints["c4"]).unwrap();
    let ro_sock = r.dir.path().join("ro.sock");
    let ro = Server::start_listen(
        &r.disk,
        &format!("unix:{}", ro_sock.display()),
        &["--checkpoint", "c4"],
    );
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(format!("nbd+unix:///?socket={}", ro_sock.display()))
        .arg(&want)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ro.stop();
    r.stop_load();
    r.stop_server();
    r.check_clean();
}

/// SIGKILL of the server at random moments of merges of each strategy; after each restart
/// (which resumes or discards the interrupted merge) everything equals the model.
#[test]
fn sigkill_during_online_merges_loses_nothing() {
    let strategies = [
        "compact-into-child",
        "compact-into-parent",
        "threshold",
        "auto",
        "relink",
        "compact-into-child",
    ];
    let mut r = Rig::new(70);
    let mut rng = SmallRng::seed_from_u64(71);
    r.start_server();
    r.start_load(true);
    for i in 0..3 {
        r.run_load(200);
        r.checkpoint(&format!("k{i}"));
    }
    for (round, strategy) in strategies.iter().enumerate() {
        r.run_load(200);
        r.checkpoint(&format!("k{}", round + 3));
        r.run_load(200);
        let names: Vec<String> = r.checkpoints.keys().cloned().collect();
        let victim = names[rng.gen_range(0..names.len())].clone();
        r.delete(&victim, strategy, "1");
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..700)));
        let at = r.status();
        r.kill_server();
        eprintln!("round {round}: killed during {}", at["merges"]);
        let pending = r.stop_load();
        r.check_clean();
        r.start_server();
        r.resolve(pending);
        r.verify(&format!(
            "round {round} ({strategy}) right after the restart"
        ));
        r.wait_idle();
        r.verify(&format!(
            "round {round} ({strategy}) after the resumed merges"
        ));
        r.start_load(true);
    }
    r.stop_load();
    // A clean stop in the middle of a merge cancels it cleanly too.
    r.checkpoint("last");
    let victim = r.checkpoints.keys().next().cloned().unwrap();
    r.delete(&victim, "compact-into-child", "1");
    r.stop_server();
    r.check_clean();
    r.start_server();
    r.verify("after a clean stop during a merge");
    r.wait_idle();
    r.verify("at the end");
    r.stop_server();
    r.check_clean();
}

/// fio's NBD engine writing 4 KiB blocks at random with `depth` requests in flight over `size`
/// bytes of the served disk: `io` bytes in all, or (with `io` = None) until killed, at most
/// `secs` seconds.
fn fio(sock: &Path, depth: u32, size: &str, io: Option<&str>, secs: u64) -> std::process::Command {
    let mut c = std::process::Command::new("fio");
    c.args([
        "--name=load",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4096",
        "--randrepeat=0",
        "--norandommap",
        "--output=/dev/null",
    ])
    .arg(format!("--uri=nbd+unix:///?socket={}", sock.display()))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--size={size}"))
    .arg(format!("--runtime={secs}"))
    .stdin(std::process::Stdio::null());
    match io {
        Some(io) => c.arg(format!("--io_size={io}")),
        None => c.arg("--time_based"),
    };
    c
}

/// Waits for `child` at most `limit`; kills it and fails with `what` past that.
fn wait_bounded(mut child: std::process::Child, limit: Duration, what: &str) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let (o, e) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(out.status.success(), "{what} failed: {o}{e}");
            return format!("{o}{e}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not end within {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fio keeps 32 requests in flight (the other tests' clients send one at a time) while checkpoints are deleted with every strategy and `--wait`; each merge must
/// be swapped in (its swap drains those 32 requests with the gate closed) within a bound, and
/// every checkpoint left must read exactly as before.
#[test]
fn deletes_under_a_qd32_fio_load_finish_and_keep_every_checkpoint() {
    require_tool("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let disk = nbd_common::create_disk(dir.path(), "disk", "64M");
    let server = Server::start(&disk, dir.path(), &[]);
    let api = server.api.display().to_string();
    let export = |name: &str| -> Vec<u8> {
        let out = dir.path().join(format!("{name}.raw"));
        run_ok(
            strata(&["disk", "export"])
                .arg(&disk)
                .arg(name)
                .arg("--output")
                .arg(&out),
        );
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        data
    };
    let names: Vec<String> = (0..7).map(|i| format!("q{i}")).collect();
    for name in &names {
        let fill = fio(&server.sock, 32, "48M", Some("8M"), 120)
            .spawn()
            .unwrap();
        wait_bounded(fill, Duration::from_secs(180), "an fio fill");
        run_ok(strata(&[
            "checkpoint",
            "create",
            "--api",
            &api,
            "--name",
            name,
        ]));
    }
    let kept = ["q0", "q6"];
    let before: Vec<Vec<u8>> = kept.iter().map(|n| export(n)).collect();
    let load = fio(&server.sock, 32, "48M", None, 600).spawn().unwrap();
    let strategies = [
        "compact-into-child",
        "relink",
        "compact-into-parent",
        "threshold",
        "auto",
    ];
    for (victim, strategy) in names[1..6].iter().zip(strategies) {
        std::thread::sleep(Duration::from_millis(300));
        let del = strata(&[
            "checkpoint",
            "delete",
            "--api",
            &api,
            victim,
            "--strategy",
            strategy,
            "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let out = wait_bounded(
            del,
            Duration::from_secs(300),
            &format!("delete {victim} --strategy {strategy} --wait under fio"),
        );
        assert!(out.contains(&format!("deleted {victim}")), "{out}");
        let s = run_ok(strata(&["checkpoint", "status", "--api", &api, "--json"]));
        let s: Value = serde_json::from_str(&s).unwrap();
        for f in s["finished"].as_array().unwrap() {
            let state = f["status"]["state"].as_str().unwrap();
            assert!(
                !state.starts_with("failed"),
                "{strategy}: a merge failed: {f}"
            );
        }
        if strategy == "compact-into-child" {
            // Planned while fio wrote, its new layer still frees its sources batch by
            // batch (the worker places the output with I/O paused), instead of holding
            // its whole output until the swap.
            let copied: Vec<&Value> = s["finished"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| {
                    f["report"]["strategy"] == "compact-into-child"
                        && f["report"]["bytes_copied"].as_u64().unwrap_or(0) > 0
                })
                .collect();
            assert!(!copied.is_empty(), "no compact-into-child copy: {s}");
            for f in copied {
                assert_eq!(f["report"]["progressive"], true, "{f}");
            }
        }
    }
    let mut load = load;
    assert!(
        load.try_wait().unwrap().is_none(),
        "fio stopped during the deletes"
    );
    load.kill().unwrap();
    load.wait().unwrap();
    for (name, want) in kept.iter().zip(&before) {
        assert_same(
            &export(name),
            want,
            &format!("checkpoint {name} after the deletes"),
        );
    }
    let listed = run_ok(strata(&["checkpoint", "list", "--api", &api, "--json"]));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, kept);
    server.stop();
    let (rc, out, err) = run_strata(&["disk", "check", disk.to_str().unwrap()]);
    assert_eq!(rc, 0, "disk check: {out}{err}");
    assert!(out.contains("clean"), "{out}");
}
