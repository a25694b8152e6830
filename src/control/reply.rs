//! The VMM's typed answers as HTTP: status codes and JSON bodies live here
//! and nowhere else (see openapi.yaml).

use std::os::unix::net::UnixStream;

use serde_json::json;

use super::ApiResponse;
use crate::snapshot::store::StoreError;
use crate::vmm::{ExecCallback, ExecError, ExecResult, Reply, VmmError};

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// A command's outcome as the response to send.
pub fn response(result: &Result<Reply, VmmError>) -> ApiResponse {
    let reply = match result {
        Ok(reply) => reply,
        Err(e) => return ApiResponse::error(error_status(e), e.to_string()),
    };
    ApiResponse::ok(match reply {
        Reply::Vm(info) => json(info),
        Reply::Stopped => json!({ "stopped": true }),
        Reply::Paused { pause } => {
            json!({ "state": "paused", "pause_us": pause.as_micros() as u64 })
        }
        Reply::Running => json!({ "state": "running" }),
        Reply::SnapshotCreated(r) => json(r),
        Reply::Reverted(r) => json(r),
        Reply::Snapshots(list) => list.clone(),
        Reply::Snapshot(manifest) => json(manifest),
        Reply::SnapshotDeleted { name, report } => json!({
            "deleted": name,
            "layers": report.layers,
            "reparented": report.reparented,
            "new_parent": report.new_parent,
        }),
    })
}

/// Not found, taken names, refused snapshots and exec on a guest without an
/// agent are the client's doing; the rest is ours.
fn error_status(e: &VmmError) -> u16 {
    match e {
        VmmError::Store(StoreError::NotFound { .. }) | VmmError::SnapshotLookup(_) => 404,
        VmmError::Store(StoreError::Exists(_)) | VmmError::NoAgent(_) => 409,
        VmmError::Bundle(_) => 422,
        _ => 500,
    }
}

/// An exec's result as the response to send.
pub fn exec_response(result: &ExecResult) -> ApiResponse {
    match result {
        Ok(out) => ApiResponse::ok(json!({
            "status": out.status,
            "stdout": String::from_utf8_lossy(&out.stdout),
            "stderr": String::from_utf8_lossy(&out.stderr),
        })),
        Err(e) => {
            let status = match e {
                ExecError::Timeout(_) => 504,
                ExecError::LineTooLong => 502,
                ExecError::OutputTooLarge => 507,
                ExecError::Refused(_) => 500,
            };
            ApiResponse::error(status, e.to_string())
        }
    }
}

/// Answers `stream` with an exec's result once it is known.
pub fn exec_waiter(stream: UnixStream) -> ExecCallback {
    Box::new(move |result| super::server::respond(&stream, &exec_response(&result)))
}
