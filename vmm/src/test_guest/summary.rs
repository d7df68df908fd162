//! The guest's console protocol: the final `done` line and the `error` lines.

use std::fmt;

use super::Error;

/// Every line the guest prints starts with this.
pub const LINE_PREFIX: &str = "strata-guest: ";
/// The final summary line starts with this.
pub const DONE_PREFIX: &str = "strata-guest: done ";
const ERROR_PREFIX: &str = "strata-guest: error ";

/// The counters of the guest's final line
/// `strata-guest: done ops=N reads=N writes=N flushes=N errors=N bytes=N cycles=N iops=N
/// max_stall_us=N dirtied=N ledger=X mem=X kicks=N waits=N` (X: 16 lowercase hex digits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Reads plus writes completed.
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Failed requests, mismatching sectors and dirty-region pages that held the wrong data.
    pub errors: u64,
    /// Data bytes read and written.
    pub bytes: u64,
    /// TSC cycles from the first submission to the last completion (the sum of the gaps
    /// between the loop's progress points: a TSC that goes backwards counts 0).
    pub cycles: u64,
    /// `ops` per second by the guest's TSC (0 if the VMM gave no TSC frequency).
    pub iops: u64,
    /// The longest gap between two progress points of the guest's workload loop (a turn of
    /// the loop, a console byte, a dirty page rewritten), in microseconds by its TSC (0 without
    /// a TSC frequency): the downtime as the guest felt it.
    pub max_stall_us: u64,
    /// Pages of the dirty region rewritten (0 without `dirty=`).
    pub dirtied: u64,
    /// FNV-1a 64 of the ledger tags (little-endian u32s, in region order): see
    /// [`ledger_digest`](super::ledger::ledger_digest).
    pub ledger: u64,
    /// FNV-1a 64 of the dirty region's bytes (of nothing without `dirty=`).
    pub mem: u64,
    /// QueueNotify writes the guest made (each an exit, handled in KVM by the ioeventfd).
    pub kicks: u64,
    /// Wait-port reads the guest made (each an exit to the VMM, which sleeps until the device
    /// interrupts).
    pub waits: u64,
}

const KEYS: [&str; 14] = [
    "ops",
    "reads",
    "writes",
    "flushes",
    "errors",
    "bytes",
    "cycles",
    "iops",
    "max_stall_us",
    "dirtied",
    "ledger",
    "mem",
    "kicks",
    "waits",
];
/// Keys whose value is 16 hex digits rather than decimal.
const HEX_KEYS: [&str; 2] = ["ledger", "mem"];

impl Summary {
    /// Parses one `done` line (a trailing `\r`/`\n` is ignored). Every key must appear once.
    pub fn parse_line(line: &str) -> Result<Self, Error> {
        let line = line.trim_end_matches(['\r', '\n']);
        let rest = line
            .strip_prefix(DONE_PREFIX)
            .ok_or_else(|| Error::Summary(format!("not a done line: {line:?}")))?;
        let mut values: [Option<u64>; 14] = [None; 14];
        for item in rest.split(' ') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| Error::Summary(format!("expected key=value, got {item:?}")))?;
            let i = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| Error::Summary(format!("unknown key {key:?}")))?;
            let v = if HEX_KEYS.contains(&key) {
                u64::from_str_radix(value, 16).ok().filter(|_| {
                    value.len() == 16
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
            } else {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
            }
            .ok_or_else(|| Error::Summary(format!("{key}: bad number {value:?}")))?;
            if values[i].replace(v).is_some() {
                return Err(Error::Summary(format!("duplicate key {key:?}")));
            }
        }
        let get =
            |i: usize| values[i].ok_or_else(|| Error::Summary(format!("missing {}", KEYS[i])));
        Ok(Self {
            ops: get(0)?,
            reads: get(1)?,
            writes: get(2)?,
            flushes: get(3)?,
            errors: get(4)?,
            bytes: get(5)?,
            cycles: get(6)?,
            iops: get(7)?,
            max_stall_us: get(8)?,
            dirtied: get(9)?,
            ledger: get(10)?,
            mem: get(11)?,
            kicks: get(12)?,
            waits: get(13)?,
        })
    }

    /// Finds and parses the `done` line in a whole console log; there must be exactly one.
    pub fn from_console(console: &str) -> Result<Self, Error> {
        let mut done = console.lines().filter(|l| l.starts_with(DONE_PREFIX));
        let line = done
            .next()
            .ok_or_else(|| Error::Summary("the guest printed no done line".into()))?;
        if done.next().is_some() {
            return Err(Error::Summary(
                "the guest printed more than one done line".into(),
            ));
        }
        Self::parse_line(line)
    }
}

/// The text after `strata-guest: error ` of every error line in a console log.
pub fn error_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(ERROR_PREFIX))
        .collect()
}

/// The guest's own format of the line.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{DONE_PREFIX}ops={} reads={} writes={} flushes={} errors={} bytes={} cycles={} iops={} \
             max_stall_us={} dirtied={} ledger={:016x} mem={:016x} kicks={} waits={}",
            self.ops,
            self.reads,
            self.writes,
            self.flushes,
            self.errors,
            self.bytes,
            self.cycles,
            self.iops,
            self.max_stall_us,
            self.dirtied,
            self.ledger,
            self.mem,
            self.kicks,
            self.waits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "strata-guest: done ops=20000 reads=10038 writes=9962 flushes=155 \
                        errors=0 bytes=81920000 cycles=705084030 iops=69364 max_stall_us=812 \
                        dirtied=40000 ledger=00f1e2d3c4b5a697 mem=cbf29ce484222325 kicks=17 \
                        waits=1234";

    #[test]
    fn parses_a_done_line() {
        let s = Summary::parse_line(&format!("{LINE}\r\n")).unwrap();
        assert_eq!(
            s,
            Summary {
                ops: 20000,
                reads: 10038,
                writes: 9962,
                flushes: 155,
                errors: 0,
                bytes: 81_920_000,
                cycles: 705_084_030,
                iops: 69364,
                max_stall_us: 812,
                dirtied: 40000,
                ledger: 0x00f1_e2d3_c4b5_a697,
                mem: 0xcbf2_9ce4_8422_2325,
                kicks: 17,
                waits: 1234,
            }
        );
        assert_eq!(s.to_string(), LINE);
    }

    #[test]
    fn refuses_malformed_lines() {
        let bad = [
            "strata-guest: start seed=1",
            "strata-guest: done ops=1",
            "strata-guest: done ops=1 reads=1 writes=0 flushes=0 errors=0 bytes=512 cycles=9",
            &format!("{LINE} ops=3"),
            &format!("{LINE} colour=3"),
            &LINE.replace("ops=20000", "ops=+20000"),
            &LINE.replace("ops=20000", "ops=2x"),
            &LINE.replace("iops=69364", "iops=99999999999999999999"),
            &LINE.replace(' ', "  "),
            &LINE.replace(" mem=cbf29ce484222325", ""),
            &LINE.replace("mem=cbf29ce484222325", "mem=cbf29ce48422232"),
            &LINE.replace("mem=cbf29ce484222325", "mem=CBF29CE484222325"),
            &LINE.replace("mem=cbf29ce484222325", "mem=+bf29ce484222325"),
            &LINE.replace("ledger=00f1e2d3c4b5a697", "ledger=16"),
            &LINE.replace("max_stall_us=812", "max_stall_us=ff"),
            &LINE.replace(" waits=1234", ""),
            &LINE.replace("kicks=17", "kicks=-1"),
        ];
        for line in bad {
            assert!(
                matches!(Summary::parse_line(line), Err(Error::Summary(_))),
                "{line}"
            );
        }
    }

    #[test]
    fn finds_the_line_in_a_console_log() {
        let log = format!(
            "strata-guest: start seed=1,ops=20000\nstrata-guest: progress ops=2001 errors=0\n\
             strata-guest: error verify sector=776 expected_tag=46\n{LINE}\n"
        );
        assert_eq!(Summary::from_console(&log).unwrap().reads, 10038);
        assert_eq!(error_lines(&log), vec!["verify sector=776 expected_tag=46"]);
        assert!(Summary::from_console("strata-guest: start x\n").is_err());
        assert!(Summary::from_console(&format!("{LINE}\n{LINE}\n")).is_err());
    }
}
