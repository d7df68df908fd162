//! The client side of the control socket: `strata checkpoint create|list --api PATH`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::Request;
use crate::{Error, Result};

/// Longest reply accepted (a list of many checkpoints).
const MAX_REPLY: u64 = 16 << 20;
/// A checkpoint waits up to 30 s for I/O to drain, then writes metadata.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request and returns the reply, or the server's error as an `Err`.
pub fn call(api: &Path, req: &Request) -> Result<Value> {
    let ctx = |e| Error::io(format!("control socket {}", api.display()), e);
    let mut s = UnixStream::connect(api).map_err(ctx)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(ctx)?;
    s.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(ctx)?;
    let mut line = serde_json::to_string(req).map_err(|e| Error::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ctx)?;
    let mut reply = Vec::new();
    BufReader::new(s.take(MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(ctx)?;
    if reply.last() != Some(&b'\n') {
        return Err(Error::Protocol(
            "the control socket closed without a complete reply".into(),
        ));
    }
    let v: Value =
        serde_json::from_slice(&reply).map_err(|e| Error::Protocol(format!("bad reply: {e}")))?;
    if v["ok"] != Value::Bool(true) {
        let msg = v["error"]
            .as_str()
            .unwrap_or("request failed without a reason");
        return Err(Error::Protocol(msg.to_string()));
    }
    Ok(v)
}

/// `strata checkpoint create --api PATH --name N`.
pub fn create(api: &Path, name: &str) -> Result<ExitCode> {
    let v = call(
        api,
        &Request::CheckpointCreate {
            name: name.to_string(),
            memory: None,
        },
    )?;
    let got = v["checkpoint"]["name"].as_str().unwrap_or(name);
    println!("checkpoint {got:?} created");
    Ok(ExitCode::SUCCESS)
}

/// `strata checkpoint list --api PATH [--json]`.
pub fn list(api: &Path, json: bool) -> Result<ExitCode> {
    let v = call(api, &Request::CheckpointList)?;
    let empty = Vec::new();
    let list = v["checkpoints"].as_array().unwrap_or(&empty);
    if json {
        let text =
            serde_json::to_string_pretty(list).map_err(|e| Error::Protocol(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", format_list(list));
    }
    Ok(ExitCode::SUCCESS)
}

/// A text table of checkpoints as sent by the server.
pub fn format_list(list: &[Value]) -> String {
    if list.is_empty() {
        return "no checkpoints\n".to_string();
    }
    let mut out = format!(
        "{:<24} {:<24} {:>12}  {:>14}\n",
        "NAME", "PARENT", "CREATED", "LAYER BYTES"
    );
    for c in list {
        let name = c["name"].as_str().unwrap_or("?");
        let parent = c["parent"].as_str().unwrap_or("-");
        let created = c["created"].as_u64().unwrap_or(0);
        let bytes = c["layer_bytes"].as_u64().unwrap_or(0);
        let now = if c["now_parent"] == Value::Bool(true) {
            "  <- Now"
        } else {
            ""
        };
        let created = utc(created);
        out.push_str(&format!(
            "{name:<24} {parent:<24} {created:<20} {bytes:>14}{now}\n"
        ));
    }
    out
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC, proleptic Gregorian).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::super::{tests::fake, ControlServer};
    use super::*;
    use std::sync::Arc;

    #[test]
    fn call_roundtrip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _server = ControlServer::start(&path, Arc::new(fake())).unwrap();
        let v = call(
            &path,
            &Request::CheckpointCreate {
                name: "a".into(),
                memory: None,
            },
        )
        .unwrap();
        assert_eq!(v["checkpoint"]["name"], "a");
        let e = call(
            &path,
            &Request::CheckpointCreate {
                name: "dup".into(),
                memory: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let v = call(&path, &Request::CheckpointList).unwrap();
        let table = format_list(v["checkpoints"].as_array().unwrap());
        assert!(table.lines().nth(1).unwrap().starts_with("a "), "{table}");
        assert!(table.contains("<- Now"));
        assert!(call(&dir.path().join("missing"), &Request::CheckpointList).is_err());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_439_679), "2026-11-23 13:14:39");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59");
    }

    #[test]
    fn empty_list() {
        assert_eq!(format_list(&[]), "no checkpoints\n");
    }
}
