//! The CLI side of the control socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{http, ApiResponse, ControlError, DeadlineStream};

/// Sends one request to the VM listening at `socket` and returns its answer,
/// whatever the status code.
///
/// `timeout` bounds the whole exchange after connecting; `None` waits
/// indefinitely, which a snapshot of a large guest may need. Connecting
/// itself only blocks if the VM's accept backlog is full.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<ApiResponse, ControlError> {
    http::check_request_target(method, path).map_err(|e| {
        ControlError::InvalidRequest(format!("cannot send {method:?} {path:?}: {e}"))
    })?;
    let body = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(|e| ControlError::InvalidRequest(format!("cannot encode the body: {e}")))?;

    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotListening {
            path: socket.to_path_buf(),
        },
        _ => ControlError::io(socket, e),
    })?;
    let mut io = DeadlineStream::new(&stream, timeout);
    let io_error = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout {
            after: timeout.unwrap_or_default(),
        },
        _ => ControlError::io(socket, e),
    };

    let sent = http::write_request(&mut io, method, path, body.as_deref());
    let response = match (sent, http::read_response(&mut io)) {
        (_, Ok(response)) => response,
        // The server may refuse early (e.g. 413) and close while we still
        // write; its answer is more useful than EPIPE, so it wins above.
        (Err(e), Err(_)) => return Err(io_error(e)),
        (Ok(()), Err(e)) => {
            return Err(match e {
                http::HttpError::Timeout => ControlError::Timeout {
                    after: timeout.unwrap_or_default(),
                },
                http::HttpError::Io(e) => io_error(e),
                http::HttpError::Closed => ControlError::BadResponse(
                    "the connection was closed without an answer".to_string(),
                ),
                other => ControlError::BadResponse(other.to_string()),
            });
        }
    };

    let body = if response.body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&response.body)
            .map_err(|e| ControlError::BadResponse(format!("the body is not valid JSON: {e}")))?
    };
    Ok(ApiResponse::new(response.status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::http::read_request;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn temp_socket(tag: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "rewind-ctl-client-{}-{tag}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A one-shot fake VM that answers with `reply` after reading a request.
    fn fake_vm(path: &Path, reply: &'static [u8]) -> thread::JoinHandle<http::Request> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req = read_request(&mut s).unwrap();
            s.write_all(reply).unwrap();
            req
        })
    }

    #[test]
    fn missing_socket_is_not_listening() {
        let path = temp_socket("missing");
        let err = request(&path, "GET", "/vm", None, None).unwrap_err();
        assert!(matches!(err, ControlError::NotListening { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("no VM is listening at {}", path.display())
        );
    }

    #[test]
    fn stale_socket_is_not_listening() {
        let path = temp_socket("stale");
        drop(UnixListener::bind(&path).unwrap());
        let err = request(&path, "GET", "/vm", None, None).unwrap_err();
        assert!(matches!(err, ControlError::NotListening { .. }), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn sends_body_and_parses_answer() {
        let path = temp_socket("ok");
        let t = fake_vm(
            &path,
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"name\":\"s1\"}\n",
        );
        let body = serde_json::json!({"name": "s1"});
        let r = request(&path, "PUT", "/snapshots", Some(&body), None).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, body);
        let req = t.join().unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/snapshots");
        assert_eq!(serde_json::from_slice::<Value>(&req.body).unwrap(), body);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn malformed_response_is_bad_response() {
        let path = temp_socket("garbage");
        let t = fake_vm(&path, b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        let err = request(&path, "GET", "/vm", None, None).unwrap_err();
        assert!(matches!(err, ControlError::BadResponse(_)), "{err}");
        t.join().unwrap();

        let t = {
            let _ = std::fs::remove_file(&path);
            fake_vm(&path, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{x}")
        };
        let err = request(&path, "GET", "/vm", None, None).unwrap_err();
        assert!(
            matches!(err, ControlError::BadResponse(ref m) if m.contains("JSON")),
            "{err}"
        );
        t.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn silent_vm_times_out() {
        let path = temp_socket("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let after = Duration::from_millis(100);
        let err = request(&path, "GET", "/vm", None, Some(after)).unwrap_err();
        assert!(
            matches!(err, ControlError::Timeout { after: a } if a == after),
            "{err}"
        );
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn injection_is_refused_before_connecting() {
        let path = temp_socket("never-created");
        for (m, p) in [
            ("GET", "/vm\r\nX: y"),
            ("GET", "vm"),
            ("G T", "/vm"),
            ("GET", "/a b"),
        ] {
            let err = request(&path, m, p, None, None).unwrap_err();
            assert!(
                matches!(err, ControlError::InvalidRequest(_)),
                "{m} {p}: {err}"
            );
            assert!(!err.to_string().contains('\n'));
        }
    }
}
