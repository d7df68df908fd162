//! Read-only commands on a disk that a running `strata disk serve` holds: `disk info`,
//! `disk tree`, `disk check`, `disk export` of a checkpoint and `disk serve --checkpoint`
//! work; exporting Now and changing the tree stay refused.

mod nbd_common;

use nbd_common::fallible_client::{pattern, NbdClient};
use nbd_common::{create_disk, run_strata, strata, Server};

#[test]
fn read_only_commands_work_while_the_disk_is_served() {
    let t = tempfile::tempdir().unwrap();
    let disk = create_disk(t.path(), "disk", "8M");
    let d = disk.to_str().unwrap();
    let server = Server::start(&disk, t.path(), &[]);
    let mut c = NbdClient::connect(&server.sock).unwrap();
    for b in 0..32 {
        assert_eq!(c.write(b * 4096, &pattern(b, 1), false).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
    let api = server.api.to_str().unwrap().to_string();
    let out = strata(&["checkpoint", "create", "--api", &api, "--name", "c1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in 0..16 {
        assert_eq!(c.write(b * 4096, &pattern(b, 2), false).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);

    let (rc, info, err) = run_strata(&["disk", "info", d]);
    assert_eq!(rc, 0, "{err}");
    assert!(info.contains("checkpoints:  1"), "{info}");
    assert!(info.contains("Now:          cannot be read"), "{info}");
    let (rc, tree, err) = run_strata(&["disk", "tree", d]);
    assert_eq!(rc, 0, "{err}");
    assert!(tree.contains("c1"), "{tree}");
    let (rc, check, err) = run_strata(&["disk", "check", d]);
    assert_eq!(rc, 0, "{check}{err}");
    assert!(check.contains("skipped: Now"), "{check}");

    // The writer keeps writing while the checkpoint is exported.
    for b in 16..24 {
        assert_eq!(c.write(b * 4096, &pattern(b, 3), false).unwrap(), 0);
    }
    let img = t.path().join("c1.raw");
    let (rc, _, err) = run_strata(&["disk", "export", d, "c1", "--output", img.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    for b in 0..32u64 {
        let at = (b * 4096) as usize;
        assert_eq!(&bytes[at..at + 4096], &pattern(b, 1)[..], "block {b}");
    }
    assert!(bytes[32 * 4096..].iter().all(|&x| x == 0));

    // Now and tree changes stay refused.
    let now_img = t.path().join("now.raw");
    let (rc, _, err) = run_strata(&["disk", "export", d, "--output", now_img.to_str().unwrap()]);
    assert_ne!(rc, 0);
    assert!(err.contains("locked"), "{err}");
    assert!(!now_img.exists());
    let (rc, _, err) = run_strata(&["disk", "checkpoint", d, "--name", "x"]);
    assert_ne!(rc, 0);
    assert!(err.contains("locked"), "{err}");

    // A second server exports the checkpoint read-only next to the writer.
    let dir2 = t.path().join("second");
    std::fs::create_dir(&dir2).unwrap();
    let ro = Server::start(&disk, &dir2, &["--checkpoint", "c1"]);
    let mut r = NbdClient::connect(&ro.sock).unwrap();
    for b in 0..32 {
        assert_eq!(
            r.read(b * 4096, 4096).unwrap().unwrap(),
            pattern(b, 1),
            "block {b}"
        );
    }
    assert_eq!(r.write(0, &[0u8; 4096], false).unwrap(), 1, "EPERM");
    r.disconnect();
    ro.stop();

    // The writer's view is untouched.
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(0, 2));
    assert_eq!(c.read(20 * 4096, 4096).unwrap().unwrap(), pattern(20, 3));
    c.disconnect();
    server.stop();
}
