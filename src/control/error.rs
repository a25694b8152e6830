//! Errors of the control socket, worded to be printed as one terminal line.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Failure of the control server or client.
#[derive(thiserror::Error, Debug)]
pub enum ControlError {
    /// A live process already answers on the socket path.
    #[error("control socket {} is in use by another running VM", .path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },

    /// Something other than a socket sits at the path; we refuse to delete it.
    #[error("{} exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket {
        /// The offending path.
        path: PathBuf,
    },

    /// Nothing accepts connections at the path (missing or stale socket).
    #[error("no VM is listening at {}", .path.display())]
    NotListening {
        /// The socket path.
        path: PathBuf,
    },

    /// An I/O error on the socket at the given path.
    #[error("control socket {}: {source}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The VM did not answer within the client's timeout.
    #[error("the VM did not answer within {}", fmt_duration(*.after))]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },

    /// The peer answered with something that is not a valid API response.
    #[error("malformed response from the VM: {0}")]
    BadResponse(String),

    /// The caller asked for a request that cannot be sent as HTTP.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ControlError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ControlError::Io {
            path: path.into(),
            source,
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.as_secs() >= 1 && d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_single_lines_naming_the_path() {
        let e = ControlError::NotListening {
            path: PathBuf::from("/run/vm1.sock"),
        };
        assert_eq!(e.to_string(), "no VM is listening at /run/vm1.sock");
        let e = ControlError::InUse {
            path: PathBuf::from("/run/vm1.sock"),
        };
        assert_eq!(
            e.to_string(),
            "control socket /run/vm1.sock is in use by another running VM"
        );
        let e = ControlError::io("/x.sock", io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(e.to_string().starts_with("control socket /x.sock: "));
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn timeout_message_formats_duration() {
        let e = ControlError::Timeout {
            after: Duration::from_secs(3),
        };
        assert_eq!(e.to_string(), "the VM did not answer within 3 s");
        let e = ControlError::Timeout {
            after: Duration::from_millis(1500),
        };
        assert_eq!(e.to_string(), "the VM did not answer within 1500 ms");
    }
}
