//! The VM side of the control socket, driven by the VM's own event loop.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{http, reply, route, sentence, ApiResponse, Command, ControlError, DeadlineStream};
use crate::vmm::{ExecCallback, Reply, VmmError};

/// Budget for reading one request, and separately for writing its response.
/// Bounds how long a slow or silent client can stall the VM's loop.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A listening control socket. The socket file is removed on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Identity of the socket file we created, so drop never deletes a
    /// socket that another process has since put at the same path.
    inode: Option<(u64, u64)>,
}

impl ControlServer {
    /// Binds a non-blocking listener at `path`.
    ///
    /// Fails with [`ControlError::InUse`] if a live process accepts
    /// connections there. A stale socket left by a crashed VM is replaced;
    /// anything that is not a socket is left alone.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let meta = fs::symlink_metadata(path).map_err(|e| ControlError::io(path, e))?;
                if !meta.file_type().is_socket() {
                    return Err(ControlError::NotASocket {
                        path: path.to_path_buf(),
                    });
                }
                // Two VMs racing for one stale path can still collide here;
                // the loser then fails in bind() below, which is acceptable.
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ControlError::io(path, e)),
                }
            }
            // E.g. EACCES: we cannot tell whether it is live, so do not touch it.
            Err(e) => return Err(ControlError::io(path, e)),
        }
        let listener = UnixListener::bind(path).map_err(|e| ControlError::io(path, e))?;
        // bind() applies the umask; the VM directory is private already, so
        // nobody can reach the socket between the bind and this chmod.
        crate::paths::set_mode(path, crate::paths::socket_mode())
            .map_err(|e| ControlError::io(path, e))?;
        let inode = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let server = ControlServer {
            listener,
            path: path.to_path_buf(),
            inode,
        };
        server
            .listener
            .set_nonblocking(true)
            .map_err(|e| ControlError::io(path, e))?;
        Ok(server)
    }

    /// The listening socket, to be polled for readability by the owner.
    pub fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one pending connection and reads its request, for commands
    /// the owner carries out and answers through the returned [`Client`].
    /// None: nothing pending, the client went away, or its request did not
    /// parse or route (it has been answered already). Client misbehaviour
    /// (garbage, timeouts, early disconnects) never fails the server.
    ///
    /// Writing to a client that already hung up relies on SIGPIPE being
    /// ignored, which the Rust runtime arranges for every binary.
    pub fn accept_command(&self) -> Option<(Client, Command)> {
        let (stream, _) = self.listener.accept().ok()?;
        // Linux does not propagate O_NONBLOCK through accept(), but the
        // timeouts below only work on a blocking socket, so do not depend on that.
        stream.set_nonblocking(false).ok()?;
        let mut reader = DeadlineStream::new(&stream, Some(IO_TIMEOUT));
        let parsed = match http::read_request(&mut reader) {
            Ok(request) => route(&request),
            Err(e) => Err(ApiResponse::error(e.status()?, sentence(&e.to_string()))),
        };
        match parsed {
            Ok(command) => Some((Client { stream }, command)),
            Err(response) => {
                respond(&stream, &response);
                None
            }
        }
    }
}

/// A connection whose command the VMM carries out; answered exactly once.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Answers with a command's outcome.
    pub fn answer(self, result: &Result<Reply, VmmError>) {
        respond(&self.stream, &reply::response(result));
    }

    /// For an exec: the client is answered when the command ends.
    pub fn exec_waiter(self) -> ExecCallback {
        reply::exec_waiter(self.stream)
    }
}

/// Sends `response` on an accepted connection.
pub(crate) fn respond(stream: &UnixStream, response: &ApiResponse) {
    let mut writer = DeadlineStream::new(stream, Some(IO_TIMEOUT));
    let _ = http::write_response(&mut writer, response.status, &response.body);
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let still_ours = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.inode);
        if still_ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client;
    use crate::vmm::VmInfo;
    use serde_json::json;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Instant;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "rewind-ctl-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub(crate) fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// What the tests' VM answers: a description for `GET /vm`, a stop
    /// for `PUT /vm/stop`, and an error for anything else.
    fn carry_out(cmd: &Command) -> Result<Reply, VmmError> {
        match cmd {
            Command::GetVm => Ok(Reply::Vm(VmInfo {
                name: "vm1".into(),
                state: "running",
                vcpus: 1,
                mem_mib: 256,
                pid: 123,
                uptime_ms: 5,
                kernel: "embedded test guest".into(),
                host: "kvm".into(),
                baseline: None,
                disks: Vec::new(),
            })),
            Command::Stop => Ok(Reply::Stopped),
            _ => Err(VmmError::Snapshot("not in this test".into())),
        }
    }

    /// One turn of the event loop's control-socket handling: accept a
    /// pending command and answer it the way the VMM does. Returns the
    /// command, if one reached the VMM.
    fn serve_pending(server: &ControlServer) -> Option<Command> {
        let (client, cmd) = server.accept_command()?;
        client.answer(&carry_out(&cmd));
        Some(cmd)
    }

    /// Serves on a thread until the returned flag is set; the thread hands
    /// back the server and every command that reached the VMM.
    #[allow(clippy::type_complexity)]
    fn serve_until(
        server: ControlServer,
    ) -> (
        Arc<AtomicBool>,
        thread::JoinHandle<(ControlServer, Vec<Command>)>,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let t = thread::spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                seen.extend(serve_pending(&server));
                thread::sleep(Duration::from_millis(2));
            }
            (server, seen)
        });
        (stop, t)
    }

    fn raw_exchange(path: &Path, request: &[u8], close_write: bool) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(request).unwrap();
        if close_write {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn end_to_end_get_vm_and_stop() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        let server = ControlServer::bind(&path).unwrap();
        let (stop, t) = serve_until(server);
        let timeout = Some(Duration::from_secs(5));
        let vm = client::request(&path, "GET", "/vm", None, timeout).unwrap();
        assert_eq!(vm.status, 200);
        assert_eq!(vm.body["name"], "vm1");
        assert_eq!(vm.body["state"], "running");
        assert_eq!(vm.body["mem_mib"], 256);
        let stopped = client::request(&path, "PUT", "/vm/stop", None, timeout).unwrap();
        assert_eq!(stopped.status, 200);
        stop.store(true, Ordering::SeqCst);
        let (server, seen) = t.join().unwrap();
        assert_eq!(seen, vec![Command::GetVm, Command::Stop]);
        drop(server);
        assert!(!path.exists(), "drop must remove the socket file");
    }

    #[test]
    fn route_and_parse_errors_never_reach_the_vmm() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        let server = ControlServer::bind(&path).unwrap();
        let (stop, t) = serve_until(server);
        let timeout = Some(Duration::from_secs(5));

        let r = client::request(&path, "GET", "/nope", None, timeout).unwrap();
        assert_eq!(r.status, 404);
        assert!(r.error_message().is_some());

        let body = json!({"name": ".bad"});
        let r = client::request(&path, "PUT", "/snapshots", Some(&body), timeout).unwrap();
        assert_eq!(r.status, 400);

        let out = raw_exchange(&path, b"this is not http\r\n\r\n", false);
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("\"error\":\""), "{out}");

        let out = raw_exchange(
            &path,
            b"PUT /snapshots HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            false,
        );
        assert!(out.starts_with("HTTP/1.1 411 Length Required\r\n"), "{out}");

        // Half a request, then the client stops sending.
        let out = raw_exchange(&path, b"PUT /vm/stop HTTP/1.1\r\nHost: x", true);
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

        stop.store(true, Ordering::SeqCst);
        let (_server, seen) = t.join().unwrap();
        assert!(seen.is_empty(), "the VMM saw {seen:?}");
    }

    #[test]
    fn disconnecting_or_silent_clients_do_not_fail_the_server() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        let server = ControlServer::bind(&path).unwrap();

        // Nothing pending.
        assert_eq!(serve_pending(&server), None);

        // Connect and hang up at once.
        drop(UnixStream::connect(&path).unwrap());
        assert_eq!(serve_pending(&server), None);

        // Send a full request, then vanish before the answer.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        drop(s);
        assert_eq!(serve_pending(&server), Some(Command::GetVm));

        // Stay silent: the server gives up after IO_TIMEOUT and answers 408.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        let start = Instant::now();
        assert_eq!(serve_pending(&server), None);
        let waited = start.elapsed();
        assert!(
            waited >= IO_TIMEOUT - Duration::from_millis(50),
            "{waited:?}"
        );
        assert!(waited < IO_TIMEOUT + Duration::from_secs(2), "{waited:?}");
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");

        // The server still serves after all of that.
        let (stop, t) = serve_until(server);
        let vm = client::request(&path, "GET", "/vm", None, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(vm.status, 200);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        // std does not unlink on drop, which mimics a crashed VM.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(matches!(
            UnixStream::connect(&path).map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionRefused)
        ));
        let server = ControlServer::bind(&path).unwrap();
        assert!(
            UnixStream::connect(&path).is_ok(),
            "new socket must be live"
        );
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn live_socket_is_in_use_and_left_intact() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        let first = ControlServer::bind(&path).unwrap();
        let err = ControlServer::bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("api.sock"));
        assert!(
            UnixStream::connect(&path).is_ok(),
            "first owner must survive"
        );
        drop(first);
    }

    #[test]
    fn non_socket_file_is_not_deleted() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        fs::write(&path, b"precious").unwrap();
        let err = ControlServer::bind(&path).unwrap_err();
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn drop_leaves_a_replacement_socket_alone() {
        let dir = TempDir::new();
        let path = dir.join("api.sock");
        let old = ControlServer::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let new = UnixListener::bind(&path).unwrap();
        drop(old);
        assert!(path.exists(), "another owner's socket was deleted");
        drop(new);
    }

    #[test]
    fn bind_in_missing_directory_is_io_error() {
        let dir = TempDir::new();
        let err = ControlServer::bind(&dir.join("no/such/dir/api.sock")).unwrap_err();
        assert!(matches!(err, ControlError::Io { .. }), "{err}");
    }
}
