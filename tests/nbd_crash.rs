//! Crash test: `strata disk serve` is SIGKILLed at random moments while a client writes and
//! flushes; after each restart every write acknowledged before a completed FLUSH reads back
//! (or a version written after it), and `strata disk check` is clean.

mod nbd_common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_common::fallible_client::{pattern, NbdClient};
use nbd_common::{run_strata, Server};
use rand::{Rng, SeedableRng};

const BLOCKS: u64 = 2048; // 8 MiB disk region

#[derive(Default)]
struct Ledger {
    /// block -> versions written, in order, with whether each was acknowledged.
    history: HashMap<u64, Vec<u64>>,
    /// block -> index in history of the newest version covered by a completed FLUSH.
    durable: HashMap<u64, usize>,
}

#[test]
fn sigkill_under_load_keeps_every_flushed_write() {
    let t = tempfile::tempdir().unwrap();
    let disk = t.path().join("disk");
    let d = disk.to_str().unwrap();
    let (rc, _, err) = run_strata(&["disk", "create", d, "--size", "16M"]);
    assert_eq!(rc, 0, "{err}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut version = 1u64;
    for round in 0..6 {
        let cache = if round % 2 == 0 { "none" } else { "writeback" };
        let server = Server::start(&disk, t.path(), &["--cache", cache]);
        // Verify everything that must have survived the previous crash.
        let mut c = NbdClient::connect(&server.sock).unwrap();
        {
            let l = ledger.lock().unwrap();
            for (&block, &idx) in &l.durable {
                let got = c
                    .read(block * 4096, 4096)
                    .unwrap()
                    .expect("read after crash");
                let legal = &l.history[&block][idx..];
                assert!(
                    legal.iter().any(|&v| pattern(block, v) == got),
                    "round {round}: block {block} lost its flushed version {}",
                    l.history[&block][idx]
                );
            }
        }
        // After a crash, a block's content is one specific version: resynchronise the ledger
        // to what is there so the next round's checks stay exact.
        {
            let mut l = ledger.lock().unwrap();
            let blocks: Vec<u64> = l.history.keys().copied().collect();
            for block in blocks {
                let got = c.read(block * 4096, 4096).unwrap().expect("read");
                let hist = l.history.get_mut(&block).unwrap();
                if let Some(pos) = hist.iter().rposition(|&v| pattern(block, v) == got) {
                    hist.truncate(pos + 1);
                    l.durable.insert(block, pos);
                } else {
                    l.durable.remove(&block);
                }
            }
        }
        let writer_ledger = ledger.clone();
        let start_version = version;
        let seed: u64 = rng.gen();
        let writer = std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut v = start_version;
            let mut unflushed: Vec<u64> = Vec::new();
            loop {
                let block = rng.gen_range(0..BLOCKS);
                v += 1;
                writer_ledger
                    .lock()
                    .unwrap()
                    .history
                    .entry(block)
                    .or_default()
                    .push(v);
                match c.write(block * 4096, &pattern(block, v), false) {
                    Ok(0) => unflushed.push(block),
                    _ => return v,
                }
                if rng.gen_ratio(1, 8) {
                    match c.flush() {
                        Ok(0) => {
                            let mut l = writer_ledger.lock().unwrap();
                            for b in unflushed.drain(..) {
                                let last = l.history[&b].len() - 1;
                                l.durable.insert(b, last);
                            }
                        }
                        _ => return v,
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..900)));
        server.kill();
        version = writer.join().unwrap() + 1;
        let l = ledger.lock().unwrap();
        assert!(
            !l.durable.is_empty(),
            "round {round}: the load produced no flushed write"
        );
    }
    let (rc, out, err) = run_strata(&["disk", "check", d]);
    assert_eq!(rc, 0, "check after crashes: {out}{err}");
    assert!(out.contains("clean"), "{out}");
}
