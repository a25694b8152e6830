//! Control API of a running VM: HTTP/1.1 + JSON over a unix socket, in the
//! style of Firecracker's API socket, so that
//! `curl --unix-socket api.sock http://localhost/vm` works.
//!
//! [`server::ControlServer`] is polled by the VM's event loop,
//! [`client::request`] is what the CLI uses, and [`route`] maps requests to
//! [`Command`]s so that the VM only ever sees validated input.

pub mod client;
pub(crate) mod error;
pub(crate) mod http;
pub(crate) mod reply;
pub(crate) mod server;

pub use error::ControlError;
pub use reply::exec_waiter;
pub use server::{Client, ControlServer};

use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Longest accepted snapshot name; names become file names.
pub const MAX_SNAPSHOT_NAME_LEN: usize = crate::config::MAX_NAME_LEN;

/// A validated request for the VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// `GET /vm`: describe the VM.
    GetVm,
    /// `PUT /vm/stop`: shut the VM down.
    Stop,
    /// `PUT /vm/pause`: pause all vCPUs.
    Pause,
    /// `PUT /vm/resume`: resume paused vCPUs.
    Resume,
    /// `PUT /snapshots`: take a snapshot; the VM picks a name if none given.
    /// PUT /vm/exec {"cmd": "...", "timeout_s": 60}: run a command in the
    /// guest through its agent; answered when the command ends.
    Exec { cmd: String, timeout_s: Option<u64> },
    SnapshotCreate {
        /// Requested snapshot name, already validated.
        name: Option<String>,
        /// Keep the guest paused while memory is written (`{"paused": true}`);
        /// by default the snapshot is live.
        paused: bool,
        /// Store all of memory even when only changes over the VM's baseline
        /// would do (`{"full": true}`): starts a new chain.
        full: bool,
    },
    /// `PUT /snapshots/{name}/revert`: restore the VM to a snapshot.
    SnapshotRevert {
        /// Snapshot name, already validated.
        name: String,
    },
    /// `GET /snapshots`: list snapshots.
    SnapshotList,
    /// `GET /snapshots/{name}`: describe one snapshot.
    SnapshotInfo {
        /// Snapshot name, already validated.
        name: String,
    },
    /// `DELETE /snapshots/{name}`: delete a snapshot.
    SnapshotDelete {
        /// Snapshot name, already validated.
        name: String,
    },
}

/// Status code and JSON body of an API answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

impl ApiResponse {
    /// A response with an arbitrary status and body.
    pub fn new(status: u16, body: Value) -> Self {
        ApiResponse { status, body }
    }

    /// A `200 OK` response.
    pub fn ok(body: Value) -> Self {
        ApiResponse::new(200, body)
    }

    /// An error response with body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        ApiResponse::new(status, json!({ "error": message.into() }))
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of an error body, if there is one.
    pub fn error_message(&self) -> Option<&str> {
        self.body.get("error").and_then(Value::as_str)
    }
}

/// Maps a parsed request to a [`Command`], or to the error response to send:
/// 404 for an unknown path, 405 for a wrong method on a known path, 400 for
/// an invalid body or snapshot name.
pub fn route(req: &http::Request) -> Result<Command, ApiResponse> {
    // Tolerate one trailing slash, which people type by habit.
    let path = match req.path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => req.path.as_str(),
    };
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method.as_str();
    match segments.as_slice() {
        ["vm"] => match method {
            "GET" => Ok(Command::GetVm),
            _ => Err(not_allowed(method, path, "GET")),
        },
        ["vm", action @ ("stop" | "pause" | "resume")] => match method {
            "PUT" => Ok(match *action {
                "stop" => Command::Stop,
                "pause" => Command::Pause,
                _ => Command::Resume,
            }),
            _ => Err(not_allowed(method, path, "PUT")),
        },
        ["vm", "exec"] => match method {
            "PUT" => exec_body(&req.body),
            _ => Err(not_allowed(method, path, "PUT")),
        },
        ["snapshots"] => match method {
            "GET" => Ok(Command::SnapshotList),
            "PUT" => {
                let (name, paused, full) = create_body(&req.body)?;
                Ok(Command::SnapshotCreate { name, paused, full })
            }
            _ => Err(not_allowed(method, path, "GET or PUT")),
        },
        ["snapshots", name] => match method {
            "GET" => Ok(Command::SnapshotInfo {
                name: checked_name(name)?,
            }),
            "DELETE" => Ok(Command::SnapshotDelete {
                name: checked_name(name)?,
            }),
            _ => Err(not_allowed(method, path, "GET or DELETE")),
        },
        ["snapshots", name, "revert"] => match method {
            "PUT" => Ok(Command::SnapshotRevert {
                name: checked_name(name)?,
            }),
            _ => Err(not_allowed(method, path, "PUT")),
        },
        _ => Err(ApiResponse::error(
            404,
            format!("There is no endpoint at {}.", clip(&req.path)),
        )),
    }
}

/// Error text echoes client input; clipping keeps it to one readable line.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() > MAX {
        let mut out: String = s.chars().take(MAX).collect();
        out.push_str("...");
        out
    } else {
        s.to_string()
    }
}

fn not_allowed(method: &str, path: &str, allowed: &str) -> ApiResponse {
    ApiResponse::error(
        405,
        format!(
            "Method {} is not allowed on {}; use {allowed}.",
            clip(method),
            clip(path)
        ),
    )
}

fn checked_name(name: &str) -> Result<String, ApiResponse> {
    if crate::config::valid_name(name) {
        Ok(name.to_string())
    } else {
        Err(ApiResponse::error(
            400,
            format!(
                "Invalid snapshot name {:?}: use 1-{MAX_SNAPSHOT_NAME_LEN} characters from A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'.",
                clip(name)
            ),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    cmd: String,
    timeout_s: Option<u64>,
}

fn exec_body(body: &[u8]) -> Result<Command, ApiResponse> {
    let parsed: ExecBody = serde_json::from_slice(body).map_err(|e| {
        ApiResponse::error(
            400,
            format!("The exec body must be {{\"cmd\": \"...\"}}: {e}."),
        )
    })?;
    if parsed.cmd.trim().is_empty() {
        return Err(ApiResponse::error(400, "The command is empty."));
    }
    Ok(Command::Exec {
        cmd: parsed.cmd,
        timeout_s: parsed.timeout_s,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    full: bool,
}

/// The optional `name` of `PUT /snapshots`. Unknown fields are rejected so a
/// typo like `{"nmae": "x"}` fails loudly instead of creating an unnamed
/// snapshot. The Content-Type is not checked because `curl -d` sends a form
/// type by default.
fn create_body(body: &[u8]) -> Result<(Option<String>, bool, bool), ApiResponse> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, false, false));
    }
    let invalid = |e: serde_json::Error| {
        ApiResponse::error(
            400,
            format!("The request body is not valid JSON for this endpoint: {e}."),
        )
    };
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    // Derived struct impls would also accept an array like ["x"].
    if !value.is_object() {
        return Err(ApiResponse::error(
            400,
            "The request body must be a JSON object such as {\"name\": \"snap1\"}.",
        ));
    }
    let parsed = CreateBody::deserialize(value).map_err(invalid)?;
    let name = parsed.name.map(|n| checked_name(&n)).transpose()?;
    Ok((name, parsed.paused, parsed.full))
}

/// Turns a lowercase error message into the sentence form used in bodies.
pub(crate) fn sentence(msg: &str) -> String {
    let mut chars = msg.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// Stream I/O bounded by one overall deadline instead of a per-call timeout,
/// so a peer trickling a byte at a time cannot hold the caller forever.
pub(crate) struct DeadlineStream<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl<'a> DeadlineStream<'a> {
    /// `timeout` of `None` means block indefinitely.
    pub(crate) fn new(stream: &'a UnixStream, timeout: Option<Duration>) -> Self {
        DeadlineStream {
            stream,
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }

    fn remaining(&self) -> io::Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(io::Error::from(io::ErrorKind::TimedOut))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.remaining()?)?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.remaining()?)?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> http::Request {
        http::Request {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn route_ok(method: &str, path: &str, body: &str) -> Command {
        match route(&req(method, path, body)) {
            Ok(c) => c,
            Err(e) => panic!("{method} {path}: {e:?}"),
        }
    }

    fn route_status(method: &str, path: &str, body: &str) -> u16 {
        match route(&req(method, path, body)) {
            Ok(c) => panic!("{method} {path} unexpectedly routed to {c:?}"),
            Err(e) => {
                assert!(e.error_message().is_some_and(|m| !m.contains('\n')));
                e.status
            }
        }
    }

    #[test]
    fn routing_table() {
        let s = |n: &str| n.to_string();
        assert_eq!(route_ok("GET", "/vm", ""), Command::GetVm);
        assert_eq!(route_ok("GET", "/vm/", ""), Command::GetVm);
        assert_eq!(route_ok("PUT", "/vm/stop", ""), Command::Stop);
        assert_eq!(route_ok("PUT", "/vm/pause", ""), Command::Pause);
        assert_eq!(route_ok("PUT", "/vm/resume", ""), Command::Resume);
        assert_eq!(route_ok("GET", "/snapshots", ""), Command::SnapshotList);
        assert_eq!(
            route_ok("PUT", "/snapshots", ""),
            Command::SnapshotCreate {
                name: None,
                paused: false,
                full: false
            }
        );
        assert_eq!(
            route_ok("PUT", "/snapshots", r#"{"name": "base-1.0"}"#),
            Command::SnapshotCreate {
                name: Some(s("base-1.0")),
                paused: false,
                full: false
            }
        );
        assert_eq!(
            route_ok("PUT", "/snapshots", r#"{"name": null}"#),
            Command::SnapshotCreate {
                name: None,
                paused: false,
                full: false
            }
        );
        assert_eq!(
            route_ok("PUT", "/snapshots", "{}"),
            Command::SnapshotCreate {
                name: None,
                paused: false,
                full: false
            }
        );
        assert_eq!(
            route_ok("PUT", "/snapshots/s1/revert", ""),
            Command::SnapshotRevert { name: s("s1") }
        );
        assert_eq!(
            route_ok("GET", "/snapshots/s1", ""),
            Command::SnapshotInfo { name: s("s1") }
        );
        assert_eq!(
            route_ok("DELETE", "/snapshots/s1", ""),
            Command::SnapshotDelete { name: s("s1") }
        );
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/",
            "/vms",
            "/vm/reboot",
            "/vm/stop/now",
            "//vm",
            "/vm//",
            "/snapshots/a/b/c",
            "/snapshots/a/restore",
        ] {
            assert_eq!(route_status("GET", path, ""), 404, "{path}");
        }
    }

    #[test]
    fn wrong_methods_are_405() {
        for (method, path) in [
            ("PUT", "/vm"),
            ("POST", "/vm"),
            ("HEAD", "/vm"),
            ("GET", "/vm/stop"),
            ("POST", "/vm/pause"),
            ("DELETE", "/vm/resume"),
            ("DELETE", "/snapshots"),
            ("POST", "/snapshots"),
            ("PUT", "/snapshots/s1"),
            ("GET", "/snapshots/s1/revert"),
            ("get", "/vm"),
        ] {
            assert_eq!(route_status(method, path, ""), 405, "{method} {path}");
        }
        let e = route(&req("POST", "/snapshots/x", "")).unwrap_err();
        assert_eq!(
            e.error_message(),
            Some("Method POST is not allowed on /snapshots/x; use GET or DELETE.")
        );
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            "{",
            "name=x",
            r#"{"name": 5}"#,
            r#"{"nmae": "x"}"#,
            r#"["x"]"#,
            r#""x""#,
            r#"{"name": "x"} trailing"#,
            r#"{"name": "../etc"}"#,
            r#"{"name": ""}"#,
        ] {
            assert_eq!(route_status("PUT", "/snapshots", body), 400, "{body}");
        }
        let e = route(&req("PUT", "/snapshots", "{")).unwrap_err();
        assert!(e
            .error_message()
            .is_some_and(|m| m.contains("not valid JSON")));
    }

    #[test]
    fn bad_names_in_path_are_400() {
        let long = "a".repeat(65);
        for path in [
            "/snapshots/.hidden".to_string(),
            "/snapshots/..".to_string(),
            "/snapshots/a%2Fb".to_string(),
            format!("/snapshots/{long}"),
        ] {
            assert_eq!(route_status("GET", &path, ""), 400, "{path}");
        }
        assert_eq!(route_status("PUT", "/snapshots/.x/revert", ""), 400);
        assert_eq!(route_status("PUT", "/snapshots/a:b/revert", ""), 400);
        assert_eq!(route_status("DELETE", "/snapshots/a*", ""), 400);
        assert_eq!(route_status("PUT", "/snapshots//revert", ""), 400);
    }

    #[test]
    fn long_input_is_clipped_in_messages() {
        let path = format!("/{}", "x".repeat(1000));
        let e = route(&req("GET", &path, "")).unwrap_err();
        let msg = e.error_message().unwrap_or("");
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains("x..."), "{msg}");
    }

    #[test]
    fn sentences() {
        assert_eq!(sentence("the body is bad"), "The body is bad.");
        assert_eq!(sentence("Done."), "Done.");
        assert_eq!(sentence(""), ".");
    }

    #[test]
    fn deadline_stream_times_out_on_silent_peer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut d = DeadlineStream::new(&a, Some(Duration::from_millis(50)));
        let start = Instant::now();
        let err = d.read(&mut [0u8; 8]).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        // Once the budget is spent, further reads fail without waiting.
        let again = Instant::now();
        let err = d.read(&mut [0u8; 8]).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        assert!(again.elapsed() < Duration::from_millis(40));
    }

    #[test]
    fn command_serializes() {
        let c = Command::SnapshotRevert {
            name: "s1".to_string(),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v, json!({"SnapshotRevert": {"name": "s1"}}));
        assert_eq!(serde_json::from_value::<Command>(v).unwrap(), c);
    }
}
