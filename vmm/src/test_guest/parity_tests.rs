//! Checks the Rust side against the guest's own C logic, compiled for the host by `build.rs`
//! (`$OUT_DIR/guest_logic_check`): spec parsing and normalisation, the sector pattern, the
//! generator and the struct layouts the Rust parsers assume.

use std::io::Write;
use std::process::{Command, Stdio};

use super::ledger::{
    dirty_gen, dirty_page_pattern, fnv1a64, mix64, sector_pattern, FNV_OFFSET, HEADER_LEN,
};
use super::{Error, WorkloadSpec, BOOT_INFO_WORKLOAD_OFFSET};

/// Runs the host build of the guest logic with one command per line; returns one answer each.
fn guest_logic(commands: &[String]) -> Vec<String> {
    let path = concat!(env!("OUT_DIR"), "/guest_logic_check");
    let mut child = Command::new(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {path} (built by vmm/build.rs): {e}"));
    let mut input = commands.join("\n");
    input.push('\n');
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "guest_logic_check failed: {:?}",
        out.status
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), commands.len(), "{text}");
    lines
}

const SPECS: &[&str] = &[
    "",
    "  seed=5,ops=7 \n",
    "seed=18446744073709551615",
    "seed=18446744073709551616",
    "ops=2000000000",
    "ops=2000000001",
    "read=0,read=1",
    "read=100",
    "bs=512",
    "bs=4K-256K",
    "bs=1m",
    "bs=1536",
    "bs=4k-2k",
    "bs=0-4k",
    "bs=4k-",
    "bs=-4k",
    "bs=4k-4k",
    "region=0:4k",
    "region=4G:1024m",
    "region=3:4k",
    "region=0:0",
    "region=0",
    "region=18446744073709551104:1024",
    "bs=8k,region=0:4k",
    "qd=1,flush=4294967295,verify=0",
    "qd=0",
    "flush=4294967296",
    "verify=2",
    "seed=1,",
    ",seed=1",
    "seed",
    "=1",
    "seed==1",
    "a_very_long_unknown_key_name_that_goes_on_and_on=1",
    "seed=1 ,ops=2",
    "seed=0x10",
    "ops=1k",
    "region=1k:1k:1k",
    "dirty=64m",
    "irq=0",
    "irq=1",
    "irq=2",
    "poll=0",
    "poll=250",
    "poll=1000000",
    "poll=1000001",
    "poll=4k",
    "irq=0,poll=10",
    "dirty=0",
    "dirty=4k,dirty_rate=4096",
    "dirty=3g",
    "dirty=3145728k",
    "dirty=3221229568",
    "dirty=4g",
    "dirty=6k",
    "dirty=100",
    "dirty=",
    "dirty=1m,dirty=2m",
    "dirty_rate=0",
    "dirty_rate=4097",
    "dirty_rate=1",
    "dirty_rate=7",
    "dirty_rate=1k",
    "seed=9,ops=500,read=30,bs=512-64k,region=0:64m,qd=32,flush=16,dirty=16m,dirty_rate=4",
];

#[test]
fn spec_parsing_matches_the_guest() {
    let cmds: Vec<String> = SPECS
        .iter()
        .map(|s| format!("spec {}", s.trim_end_matches('\n')))
        .collect();
    let answers = guest_logic(&cmds);
    for (spec, answer) in SPECS.iter().zip(&answers) {
        let spec = spec.trim_end_matches('\n');
        match WorkloadSpec::parse(spec) {
            Ok(w) => assert_eq!(answer, &format!("ok {w}"), "spec {spec:?}"),
            Err(Error::Workload(m)) => assert_eq!(answer, &format!("err {m}"), "spec {spec:?}"),
            Err(e) => panic!("spec {spec:?}: unexpected {e:?}"),
        }
    }
    assert!(answers.iter().filter(|a| a.starts_with("ok ")).count() >= 10);
    assert!(answers.iter().filter(|a| a.starts_with("err ")).count() >= 10);
}

#[test]
fn pattern_and_generator_match_the_guest() {
    let cases: &[(u64, u64, u32)] = &[
        (1, 0, 1),
        (99, 2048, 13912),
        (u64::MAX, u64::MAX, u32::MAX - 1),
    ];
    let mut cmds: Vec<String> = cases
        .iter()
        .map(|(s, sec, t)| format!("pattern {s} {sec} {t}"))
        .collect();
    cmds.push("rng 7 4".into());
    let answers = guest_logic(&cmds);
    for ((seed, sector, tag), answer) in cases.iter().zip(&answers) {
        let hex: String = sector_pattern(*seed, *sector, *tag)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(answer, &hex, "seed {seed} sector {sector} tag {tag}");
    }
    let mut state = 7u64;
    let rng: Vec<String> = (0..4)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix64(state).to_string()
        })
        .collect();
    assert_eq!(answers[cases.len()], rng.join(" "));
}

#[test]
fn struct_layouts_match_the_guest() {
    let answers = guest_logic(&["layout".to_string()]);
    let expect = format!(
        "boot_info mem_size=8 tsc_khz=28 workload_len=32 workload={BOOT_INFO_WORKLOAD_OFFSET} \
         ledger seed=8 region_sector=16 region_sectors=24 state=32 qd=36 last_tag=40 \
         completed=48 errors=56 slots=64 slot_size=24 dirty_base=3136 dirty_pages=3144 \
         dirty_written=3152 dirty_rate=3160 size={HEADER_LEN}"
    );
    assert_eq!(answers[0], expect);
}

#[test]
fn dirty_pattern_generations_and_digest_match_the_guest() {
    let pages: &[(u64, u64, u64)] = &[(1, 0, 0), (77, 16383, 9), (u64::MAX, u64::MAX, u64::MAX)];
    let gens: &[(u64, u64, u64)] = &[(0, 4, 0), (5, 4, 0), (5, 4, 1), (9, 4, 3), (u64::MAX, 3, 2)];
    let blobs: &[&[u8]] = &[b"", b"a", b"foobar", &[0, 1, 2, 0xff, 0x80, 0x7f, 0x10]];
    let mut cmds: Vec<String> = pages
        .iter()
        .map(|(s, p, g)| format!("dirty {s} {p} {g}"))
        .collect();
    cmds.extend(gens.iter().map(|(w, n, p)| format!("gen {w} {n} {p}")));
    cmds.extend(blobs.iter().map(|b| {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("fnv {hex}")
    }));
    let answers = guest_logic(&cmds);
    let mut a = answers.iter();
    for (seed, page, gen) in pages {
        let hex: String = dirty_page_pattern(*seed, *page, *gen)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(a.next().unwrap(), &hex, "dirty {seed} {page} {gen}");
    }
    for (written, n, page) in gens {
        let want = dirty_gen(*written, *n, *page).to_string();
        assert_eq!(a.next().unwrap(), &want, "gen {written} {n} {page}");
    }
    for b in blobs {
        let want = format!("{:016x}", fnv1a64(FNV_OFFSET, b));
        assert_eq!(a.next().unwrap(), &want, "fnv {b:?}");
    }
}

#[test]
fn memory_plan_matches_the_guest() {
    let cases: &[(u64, &str)] = &[
        (256 << 20, ""),
        (256 << 20, "dirty=64m"),
        (256 << 20, "dirty=188m"),
        (256 << 20, "dirty=192m"),
        (256 << 20, "dirty=192m,bs=256k"),
        ((256 << 20) + 512, "dirty=4k"),
        (3 << 30, "dirty=3g"),
        (3 << 30, "dirty=2g"),
        (4 << 30, "dirty=2g"),
        ((64 << 20) + 8192, "bs=4k"),
        ((64 << 20) + 4096, "bs=4k"),
        (64 << 20, ""),
    ];
    let specs: Vec<WorkloadSpec> = cases
        .iter()
        .map(|(_, t)| WorkloadSpec::parse(t).unwrap())
        .collect();
    let cmds: Vec<String> = cases
        .iter()
        .zip(&specs)
        .map(|((mem, _), w)| format!("plan {mem} {} {}", w.dirty, w.block_size.max))
        .collect();
    let answers = guest_logic(&cmds);
    let mut refused = 0;
    for (((mem, text), w), answer) in cases.iter().zip(&specs).zip(&answers) {
        match w.memory_plan(*mem) {
            Ok(p) => {
                assert_eq!(
                    answer,
                    &format!("ok {} {}", p.dirty_base, p.ledger_sectors),
                    "{mem} {text}"
                );
                assert_eq!(p.dirty_pages, w.dirty / 4096);
            }
            Err(Error::Dirty { max, .. }) => {
                assert_eq!(answer, &format!("err -2 {max}"), "{mem} {text}");
                refused += 1;
            }
            Err(Error::MemorySize { .. }) => {
                assert_eq!(answer, "err -1 0", "{mem} {text}");
                refused += 1;
            }
            Err(e) => panic!("{mem} {text}: {e:?}"),
        }
    }
    assert!(refused >= 3 && refused < cases.len(), "{answers:?}");
}
