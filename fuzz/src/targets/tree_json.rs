//! `strata.json`: a copy of a real disk gets mutated metadata (JSON-aware edits driven by the
//! input's control bytes, then the input's own text bytes), or a metadata file of the wrong
//! type; it is then opened read-only and read-write, every view read and checked, and tree
//! operations run. A tree operation that succeeds must leave a disk that opens again.
//!
//! Input: control length (u16 LE), control bytes (file kind, then edits), then the JSON text
//! (empty: the template's own `strata.json`).

use std::path::Path;

use arbitrary::Unstructured;
use journal::Disk;
use serde_json::Value;

use super::Target;
use crate::disk;

pub const TARGET: Target = Target {
    name: "tree_json",
    about: "strata.json metadata (open, views, check, checkpoint/rename/delete, reopen)",
    run,
    seeds,
    keep_last_input: true,
};

const NUMBERS: &[i128] = &[
    0,
    1,
    2,
    3,
    -1,
    255,
    4096,
    4095,
    1 << 20,
    (1 << 20) + 512,
    1 << 53,
    (1 << 53) + 1,
    u32::MAX as i128,
    (1 << 63) - 1,
    (u64::MAX - 1) as i128,
    u64::MAX as i128,
    u64::MAX as i128 + 1,
];

/// Fields whose values the journal computes with (and the elements of `layers`).
const KEYS: &[&str] = &[
    "next_id",
    "id",
    "parent",
    "layers",
    "size",
    "block_size",
    "format",
    "uuid",
    "base",
    "name",
];

fn strings(dir: &Path) -> Vec<String> {
    vec![
        String::new(),
        "a".into(),
        "b".into(),
        "\u{7}".into(),
        "x".repeat(101),
        "00000000000000000000000000000000".into(),
        "ffffffffffffffffffffffffffffffffff".into(),
        "zz".into(),
        "/dev/zero".into(),
        "/dev/null".into(),
        "/nonexistent/base.raw".into(),
        dir.join("layers").display().to_string(),
        dir.join("strata.json").display().to_string(),
    ]
}

/// Every value's JSON pointer.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn number(u: &mut Unstructured) -> Value {
    let n = *u.choose(NUMBERS).unwrap_or(&0);
    if u.ratio(1, 8).unwrap_or(false) {
        return serde_json::json!(n as f64 + 0.5);
    }
    if let Ok(x) = u64::try_from(n) {
        Value::from(x)
    } else if let Ok(x) = i64::try_from(n) {
        Value::from(x)
    } else {
        serde_json::from_str(&n.to_string()).unwrap_or(Value::Null)
    }
}

fn edit(v: &mut Value, u: &mut Unstructured, dir: &Path) {
    let mut ptrs = Vec::new();
    pointers(v, String::new(), &mut ptrs);
    // Half the edits go to the fields the journal computes with.
    let keyed: Vec<String> = ptrs
        .iter()
        .filter(|p| {
            let last = p.rsplit('/').next().unwrap_or("");
            let parent = p.rsplit('/').nth(1).unwrap_or("");
            KEYS.contains(&last) || KEYS.contains(&parent)
        })
        .cloned()
        .collect();
    let pool = if !keyed.is_empty() && u.ratio(1, 2).unwrap_or(false) {
        &keyed
    } else {
        &ptrs
    };
    let Ok(p) = u.choose(pool).cloned() else {
        return;
    };
    let op = u.int_in_range(0..=7u8).unwrap_or(0);
    let strs = strings(dir);
    let other = u.choose(&ptrs).cloned().unwrap_or_default();
    let other_val = v.pointer(&other).cloned();
    let Some(target) = v.pointer_mut(&p) else {
        return;
    };
    match op {
        0 => *target = number(u),
        1 => *target = Value::from(u.choose(&strs).cloned().unwrap_or_default()),
        2 => {
            *target = match u.int_in_range(0..=3u8).unwrap_or(0) {
                0 => Value::Null,
                1 => Value::Bool(true),
                2 => Value::Array(vec![]),
                _ => Value::Object(Default::default()),
            }
        }
        3 => {
            // Remove a key or an element.
            if let Value::Object(m) = target {
                let keys: Vec<String> = m.keys().cloned().collect();
                if let Ok(k) = u.choose(&keys) {
                    m.remove(k);
                }
            } else if let Value::Array(a) = target {
                if !a.is_empty() {
                    let i = u.choose_index(a.len()).unwrap_or(0);
                    a.remove(i);
                }
            }
        }
        4 => {
            // Duplicate an element (a node, a layer id).
            if let Value::Array(a) = target {
                if let Ok(x) = u.choose(a).cloned() {
                    a.push(x);
                }
            }
        }
        5 => {
            // Copy another value here (a node's id into a parent, a layer list elsewhere).
            if let Some(o) = other_val {
                *target = o;
            }
        }
        6 => {
            if let Value::Object(m) = target {
                m.insert("unknown_field".into(), Value::from(1));
            }
        }
        _ => {
            if let Value::Array(a) = target {
                a.reverse();
            }
        }
    }
}

fn run(input: &[u8]) {
    let n = input
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        .min(input.len().saturating_sub(2));
    let control = &input[input.len().min(2)..input.len().min(2) + n];
    let text = &input[(2 + n).min(input.len())..];

    let dir = disk::fresh_copy();
    let meta = dir.join("strata.json");
    let mut u = Unstructured::new(control);
    let kind = u.int_in_range(0..=15u8).unwrap_or(0);
    let mut bytes = if text.is_empty() {
        std::fs::read(&meta).expect("template metadata")
    } else {
        text.to_vec()
    };
    if let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) {
        // Seeds were written from another template: adopt this disk's identity (the layer
        // logs are bound to it), except for file kind 5, which keeps the input's.
        if let (Some(Value::String(id)), true) = (v.get_mut("uuid"), kind != 5) {
            *id = format!("{:032x}", disk::layer_ids(&dir).0);
        }
        let edits = u.int_in_range(0..=4u8).unwrap_or(0);
        for _ in 0..edits {
            edit(&mut v, &mut u, &dir);
        }
        bytes = serde_json::to_vec_pretty(&v).expect("json");
    }
    std::fs::remove_file(&meta).expect("removing the metadata");
    match kind {
        // The wrong kind of file: a FIFO, a device, a directory, a huge sparse file.
        1 => {
            let c = std::ffi::CString::new(meta.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
            assert_eq!(r, 0, "mkfifo");
        }
        2 => std::os::unix::fs::symlink("/dev/zero", &meta).expect("symlink"),
        3 => std::fs::create_dir(&meta).expect("mkdir"),
        4 => {
            let f = std::fs::File::create(&meta).expect("create");
            f.set_len(1 << 40).expect("sparse metadata");
        }
        _ => std::fs::write(&meta, &bytes).expect("writing the metadata"),
    }

    if let Ok(d) = Disk::open(&dir, disk::opts(true)) {
        disk::exercise(&d, None);
    }
    let Ok(mut d) = Disk::open(&dir, disk::opts(false)) else {
        return;
    };
    disk::exercise(&d, None);
    let names: Vec<String> = d.list().into_iter().map(|c| c.name).collect();
    let op = u.int_in_range(0..=3u8).unwrap_or(0);
    let first = names.first().cloned().unwrap_or_default();
    let did = match op {
        0 => d.checkpoint("fz").map(drop),
        1 => d.rename(&first, "fz2"),
        2 => d.delete(&first, false).map(drop),
        _ => d.apply(&first, Some("fz3")),
    };
    drop(d);
    if let Err(e) = did {
        let _ = e;
        return;
    }
    match Disk::open(&dir, disk::opts(true)) {
        Ok(d) => disk::exercise(&d, None),
        Err(e) => panic!("tree operation {op} succeeded but the disk no longer opens: {e}"),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let text = std::fs::read(disk::template().join("strata.json")).expect("template metadata");
    let with = |control: &[u8], text: &[u8]| {
        let mut v = (control.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(control);
        v.extend_from_slice(text);
        v
    };
    let mut out = vec![with(&[], &text), with(&[0, 0, 0], &[])];
    for c in 0..4u8 {
        out.push(with(&[0, 1, 30 * c, 2, 60, 1, c], &text));
    }
    // Long controls, so that mutations steer several edits and the final operation.
    let mut rng = crate::rng::Rng::new(7);
    for _ in 0..8 {
        let mut c: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
        c[0] = 0;
        out.push(with(&c, &text));
    }
    // Regression: a counter at its limit, then a checkpoint (issue 6, item 8).
    if let Ok(mut v) = serde_json::from_slice::<Value>(&text) {
        v["next_id"] = Value::from(u64::MAX);
        out.push(with(&[0, 0, 0], &serde_json::to_vec(&v).expect("json")));
    }
    out
}
