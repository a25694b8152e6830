//! On-disk encodings of a snapshot: the binary machine state (`state.bin`)
//! and the human-readable JSON manifest.
//!
//! This is the only module that knows bincode, so the wire format can be
//! changed (with a [`STATE_FORMAT_VERSION`] bump) without touching callers.
//!
//! `state.bin` layout, all integers little endian:
//!
//! | offset | size | field                          |
//! |--------|------|--------------------------------|
//! | 0      | 8    | magic `RWNDSTAT`               |
//! | 8      | 4    | format version                 |
//! | 12     | 4    | flags (must be 0)              |
//! | 16     | 8    | body length in bytes           |
//! | 24     | 8    | CRC-64/XZ of the body          |
//! | 32     | n    | body: bincode 2, standard cfg  |
//!
//! Bincode is not self-describing, so state types must not rely on
//! `deserialize_any` (`#[serde(untagged)]`, `#[serde(flatten)]`,
//! `skip_serializing_if`); those encode fine and then fail to decode.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fsutil;

pub const STATE_FORMAT_VERSION: u32 = 1;

const MAGIC: [u8; 8] = *b"RWNDSTAT";
const HEADER_LEN: usize = 32;

/// Upper bound on a state body. Decoding untrusted input must not be able to
/// make us allocate more than this, and we never write what we would refuse
/// to read back.
pub const MAX_STATE_BODY_LEN: usize = 256 << 20;

/// The manifest is small; anything bigger than this is not one of ours.
const MAX_JSON_LEN: u64 = 16 << 20;

/// Errors from encoding/decoding snapshot files. Each renders as one line
/// that names the file (or "state data" for in-memory buffers).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "{origin} is too short to be a rewind state file: {len} bytes, header alone is {HEADER_LEN}"
    )]
    TooShort { origin: String, len: usize },

    #[error("{origin} is not a rewind state file (starts with \"{}\", expected \"RWNDSTAT\")", .found.escape_ascii())]
    BadMagic { origin: String, found: [u8; 8] },

    #[error(
        "{origin} has unsupported format version {found}, this build supports version {supported}"
    )]
    UnsupportedVersion {
        origin: String,
        found: u32,
        supported: u32,
    },

    /// Flags would announce a body encoding (e.g. compression) we do not
    /// understand; decoding anyway would misreport it as corruption.
    #[error("{origin} uses unsupported flags {flags:#x}")]
    UnsupportedFlags { origin: String, flags: u32 },

    #[error("{origin} {}: header says {expected} body bytes, found {actual}",
        if .actual < .expected { "is truncated" } else { "has trailing bytes" })]
    LengthMismatch {
        origin: String,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{origin} is corrupt: body checksum {actual:#018x} does not match header {expected:#018x}"
    )]
    ChecksumMismatch {
        origin: String,
        expected: u64,
        actual: u64,
    },

    /// `detail` is bincode's message as text so bincode types stay private
    /// to this module.
    #[error("{origin} is corrupt: cannot decode body: {detail}")]
    Decode { origin: String, detail: String },

    #[error("{origin} is corrupt: body has {} unused bytes after the decoded state ({used} of {len} used)", .len - .used)]
    TrailingBody {
        origin: String,
        used: usize,
        len: usize,
    },

    #[error("{origin} is too large: {len} bytes, limit is {limit}")]
    TooLarge {
        origin: String,
        len: u64,
        limit: u64,
    },

    #[error("cannot encode machine state: {detail}")]
    Encode { detail: String },

    #[error("cannot encode JSON for {path}: {source}")]
    JsonEncode {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{kind} {path} is missing")]
    Missing { kind: &'static str, path: PathBuf },

    #[error("JSON file {path} is corrupt: {source}")]
    JsonCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("cannot {action} {kind} {path}: {source}")]
    Io {
        action: &'static str,
        kind: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

// ---------------------------------------------------------------------------
// CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout all ones).
// Written here rather than pulled in as a crate: it is 20 lines and the
// format must never change under us because a dependency did.

const CRC64_POLY_REFLECTED: u64 = 0xC96C_5795_D787_0F42;

const CRC64_TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC64_POLY_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-64/XZ of `data` (check value for `b"123456789"` is
/// `0x995DC9BBDF1939FA`).
pub fn crc64_xz(data: &[u8]) -> u64 {
    crc64_xz_end(crc64_xz_add(CRC64_XZ_START, data))
}

/// The running value a CRC-64/XZ over several pieces starts from.
pub const CRC64_XZ_START: u64 = u64::MAX;

/// Adds `data` to a running CRC-64/XZ (no allocation: a forked child may
/// call it).
pub fn crc64_xz_add(mut crc: u64, data: &[u8]) -> u64 {
    for &b in data {
        crc = CRC64_TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

pub fn crc64_xz_end(crc: u64) -> u64 {
    crc ^ u64::MAX
}

// ---------------------------------------------------------------------------

const IN_MEMORY: &str = "state data";

fn state_file_origin(path: &Path) -> String {
    format!("state file {}", path.display())
}

/// Encodes `value` as a complete `state.bin` image (header + body).
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        FormatError::Encode {
            detail: e.to_string(),
        }
    })?;
    if body.len() > MAX_STATE_BODY_LEN {
        return Err(FormatError::TooLarge {
            origin: IN_MEMORY.to_owned(),
            len: body.len() as u64,
            limit: MAX_STATE_BODY_LEN as u64,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc64_xz(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a `state.bin` image produced by [`encode_state`].
///
/// Safe on untrusted input: never panics, and allocation is capped at
/// [`MAX_STATE_BODY_LEN`] by bincode's decode limit.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    decode_state_from(bytes, IN_MEMORY)
}

fn le_u32(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn decode_state_from<T: DeserializeOwned>(bytes: &[u8], origin: &str) -> Result<T, FormatError> {
    let origin = || origin.to_owned();
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(FormatError::TooShort {
            origin: origin(),
            len: bytes.len(),
        });
    };

    let mut found = [0u8; 8];
    found.copy_from_slice(&header[..8]);
    if found != MAGIC {
        return Err(FormatError::BadMagic {
            origin: origin(),
            found,
        });
    }
    let version = le_u32(header, 8);
    if version != STATE_FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            origin: origin(),
            found: version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    let flags = le_u32(header, 12);
    if flags != 0 {
        return Err(FormatError::UnsupportedFlags {
            origin: origin(),
            flags,
        });
    }
    let body_len = le_u64(header, 16);
    if body_len != body.len() as u64 {
        return Err(FormatError::LengthMismatch {
            origin: origin(),
            expected: body_len,
            actual: body.len() as u64,
        });
    }
    let expected_crc = le_u64(header, 24);
    let actual_crc = crc64_xz(body);
    if expected_crc != actual_crc {
        return Err(FormatError::ChecksumMismatch {
            origin: origin(),
            expected: expected_crc,
            actual: actual_crc,
        });
    }

    let config = bincode::config::standard().with_limit::<MAX_STATE_BODY_LEN>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, config).map_err(|e| {
        FormatError::Decode {
            origin: origin(),
            detail: e.to_string(),
        }
    })?;
    if used != body.len() {
        return Err(FormatError::TrailingBody {
            origin: origin(),
            used,
            len: body.len(),
        });
    }
    Ok(value)
}

/// Encodes `value` and atomically writes it to `path`; returns the number of
/// bytes written.
pub fn write_state_file<T: Serialize>(path: &Path, value: &T) -> Result<u64, FormatError> {
    let bytes = encode_state(value).map_err(|e| match e {
        FormatError::TooLarge { len, limit, .. } => FormatError::TooLarge {
            origin: state_file_origin(path),
            len,
            limit,
        },
        other => other,
    })?;
    fsutil::atomic_write(path, &bytes).map_err(|source| FormatError::Io {
        action: "write",
        kind: "state file",
        path: path.to_owned(),
        source,
    })?;
    Ok(bytes.len() as u64)
}

/// Reads `path` fully, refusing files larger than `limit` before allocating
/// for them.
fn read_bounded(path: &Path, kind: &'static str, limit: u64) -> Result<Vec<u8>, FormatError> {
    let io_err = |action: &'static str| {
        move |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                FormatError::Missing {
                    kind,
                    path: path.to_owned(),
                }
            } else {
                FormatError::Io {
                    action,
                    kind,
                    path: path.to_owned(),
                    source,
                }
            }
        }
    };
    let file = File::open(path).map_err(io_err("open"))?;
    let len = file.metadata().map_err(io_err("stat"))?.len();
    if len > limit {
        return Err(FormatError::TooLarge {
            origin: format!("{kind} {}", path.display()),
            len,
            limit,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // take() keeps the bound even if the file grows after the stat.
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read"))?;
    if buf.len() as u64 > limit {
        return Err(FormatError::TooLarge {
            origin: format!("{kind} {}", path.display()),
            len: buf.len() as u64,
            limit,
        });
    }
    Ok(buf)
}

/// Reads and decodes a `state.bin` written by [`write_state_file`].
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    read_state_file_summed(path).map(|(value, _, _)| value)
}

/// Like [`read_state_file`], also returning the file's length and the
/// CRC-64/XZ of all of it (header included), as a manifest records them.
pub fn read_state_file_summed<T: DeserializeOwned>(
    path: &Path,
) -> Result<(T, u64, u64), FormatError> {
    let limit = (HEADER_LEN + MAX_STATE_BODY_LEN) as u64;
    let bytes = read_bounded(path, "state file", limit)?;
    let value = decode_state_from(&bytes, &state_file_origin(path))?;
    Ok((value, bytes.len() as u64, crc64_xz(&bytes)))
}

/// Writes `value` as pretty JSON (with trailing newline) atomically.
/// A value as the pretty JSON rewind's files hold.
pub fn json_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| FormatError::JsonEncode {
        path: Default::default(),
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

pub fn write_json_file<T: Serialize>(path: &Path, value: &T) -> Result<(), FormatError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| FormatError::JsonEncode {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    fsutil::atomic_write(path, &bytes).map_err(|source| FormatError::Io {
        action: "write",
        kind: "JSON file",
        path: path.to_owned(),
        source,
    })
}

/// Reads a JSON file, distinguishing "missing" from "corrupt".
pub fn read_json_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let bytes = read_bounded(path, "JSON file", MAX_JSON_LEN)?;
    serde_json::from_slice(&bytes).map_err(|source| FormatError::JsonCorrupt {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::tests::TestDir;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Running,
        Paused { reason: String },
        Halted(u8, i64),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Regs {
        rip: u64,
        xmm: [u128; 2],
        cr: Option<u64>,
    }

    // `kind` goes first so tests can find its variant index at body[0].
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Machine {
        kind: Kind,
        vcpus: Vec<Regs>,
        blob: Vec<u8>,
        name: Option<String>,
        tsc: u128,
        negative: i32,
        devices: Vec<(String, Option<Kind>)>,
    }

    fn sample() -> Machine {
        Machine {
            kind: Kind::Paused {
                reason: "snapshot".into(),
            },
            vcpus: vec![
                Regs {
                    rip: 0xffff_ffff_8100_0000,
                    xmm: [u128::MAX, 1 << 100],
                    cr: Some(0x8005_0033),
                },
                Regs {
                    rip: 0,
                    xmm: [0, 42],
                    cr: None,
                },
            ],
            blob: (0..=255u8).cycle().take(1000).collect(),
            name: Some("vm-ü".into()),
            tsc: u128::MAX - 7,
            negative: -12345,
            devices: vec![
                ("serial".into(), None),
                ("virtio-blk".into(), Some(Kind::Halted(3, i64::MIN))),
                ("rtc".into(), Some(Kind::Running)),
            ],
        }
    }

    /// Rewrites header length and CRC so only the body mutation is seen.
    fn refresh_header(bytes: &mut [u8]) {
        let body_len = (bytes.len() - HEADER_LEN) as u64;
        let crc = crc64_xz(&bytes[HEADER_LEN..]);
        bytes[16..24].copy_from_slice(&body_len.to_le_bytes());
        bytes[24..32].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode_err(bytes: &[u8]) -> FormatError {
        match decode_state::<Machine>(bytes) {
            Ok(m) => panic!("decoded corrupt input into {m:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn crc64_xz_check_value() {
        assert_eq!(crc64_xz(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64_xz(b""), 0);
    }

    #[test]
    fn round_trip_nested() {
        let m = sample();
        let bytes = encode_state(&m).unwrap();
        assert_eq!(&bytes[..8], b"RWNDSTAT");
        assert_eq!(bytes[8..12], STATE_FORMAT_VERSION.to_le_bytes());
        assert_eq!(bytes[12..16], [0; 4]);
        let back: Machine = decode_state(&bytes).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn too_short() {
        let bytes = encode_state(&sample()).unwrap();
        for len in [0, 1, 8, HEADER_LEN - 1] {
            let e = decode_err(&bytes[..len]);
            assert!(
                matches!(e, FormatError::TooShort { len: l, .. } if l == len),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_state(&sample()).unwrap();
        bytes[3] ^= 0x20;
        let e = decode_err(&bytes);
        assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("not a rewind state file"), "{e}");
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = encode_state(&sample()).unwrap();
        bytes[8..12].copy_from_slice(&(STATE_FORMAT_VERSION + 1).to_le_bytes());
        let e = decode_err(&bytes);
        assert!(
            matches!(
                e,
                FormatError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "state data has unsupported format version 2, this build supports version 1"
        );
    }

    #[test]
    fn unsupported_flags() {
        let mut bytes = encode_state(&sample()).unwrap();
        bytes[12] = 1;
        let e = decode_err(&bytes);
        assert!(
            matches!(e, FormatError::UnsupportedFlags { flags: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn truncated_by_one() {
        let bytes = encode_state(&sample()).unwrap();
        let body = (bytes.len() - HEADER_LEN) as u64;
        let e = decode_err(&bytes[..bytes.len() - 1]);
        assert!(
            matches!(e, FormatError::LengthMismatch { expected, actual, .. }
                if expected == body && actual == body - 1),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "state data is truncated: header says {body} body bytes, found {}",
                body - 1
            )
        );
    }

    #[test]
    fn appended_byte() {
        let mut bytes = encode_state(&sample()).unwrap();
        let body = (bytes.len() - HEADER_LEN) as u64;
        bytes.push(0);
        let e = decode_err(&bytes);
        assert!(
            matches!(e, FormatError::LengthMismatch { expected, actual, .. }
                if expected == body && actual == body + 1),
            "{e}"
        );
        assert!(e.to_string().contains("has trailing bytes"), "{e}");
    }

    #[test]
    fn huge_length_field() {
        let mut bytes = encode_state(&sample()).unwrap();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = decode_err(&bytes);
        assert!(
            matches!(
                e,
                FormatError::LengthMismatch {
                    expected: u64::MAX,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn flipped_body_byte() {
        let mut bytes = encode_state(&sample()).unwrap();
        let mid = HEADER_LEN + (bytes.len() - HEADER_LEN) / 2;
        bytes[mid] ^= 0x01;
        let e = decode_err(&bytes);
        assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with("state data is corrupt: body checksum"));
    }

    #[test]
    fn corrupt_body_with_valid_crc_fails_in_bincode() {
        let mut bytes = encode_state(&sample()).unwrap();
        // body[0] is Kind's variant index; 3 variants exist.
        assert_eq!(bytes[HEADER_LEN], 1);
        bytes[HEADER_LEN] = 200;
        refresh_header(&mut bytes);
        let e = decode_err(&bytes);
        assert!(matches!(e, FormatError::Decode { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with("state data is corrupt: cannot decode body: "));
    }

    #[test]
    fn trailing_bytes_inside_body() {
        let mut bytes = encode_state(&sample()).unwrap();
        let real = bytes.len() - HEADER_LEN;
        bytes.extend_from_slice(&[0, 0, 0]);
        refresh_header(&mut bytes);
        let e = decode_err(&bytes);
        assert!(
            matches!(e, FormatError::TrailingBody { used, len, .. } if used == real && len == real + 3),
            "{e}"
        );
        assert!(e.to_string().contains("3 unused bytes"), "{e}");
    }

    #[test]
    fn huge_inner_length_is_bounded_not_allocated() {
        // A String claiming u64::MAX bytes, with a valid CRC: must be an error
        // from bincode's limit/EOF checks, not an allocation attempt.
        let mut bytes = encode_state(&String::from("x")).unwrap();
        bytes.truncate(HEADER_LEN);
        bytes.push(253); // varint marker: u64 follows
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        refresh_header(&mut bytes);
        let e = decode_state::<String>(&bytes).unwrap_err();
        assert!(matches!(e, FormatError::Decode { .. }), "{e}");

        // Just over the limit but plausible on 64-bit: still refused.
        let mut bytes = encode_state(&String::new()).unwrap();
        bytes.truncate(HEADER_LEN);
        bytes.push(253);
        bytes.extend_from_slice(&((MAX_STATE_BODY_LEN as u64) + 1).to_le_bytes());
        refresh_header(&mut bytes);
        let e = decode_state::<String>(&bytes).unwrap_err();
        assert!(matches!(e, FormatError::Decode { .. }), "{e}");
    }

    #[test]
    fn every_prefix_and_single_bit_flip_is_an_error_not_a_panic() {
        let bytes = encode_state(&sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(decode_state::<Machine>(&bytes[..len]).is_err());
        }
        let mut m = bytes.clone();
        for i in 0..m.len() {
            for bit in 0..8 {
                m[i] ^= 1 << bit;
                assert!(decode_state::<Machine>(&m).is_err(), "byte {i} bit {bit}");
                m[i] ^= 1 << bit;
            }
        }
    }

    #[test]
    fn state_file_round_trip_and_errors_name_path() {
        let d = TestDir::new("statefile");
        let p = d.path().join("state.bin");
        let n = write_state_file(&p, &sample()).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        let back: Machine = read_state_file(&p).unwrap();
        assert_eq!(back, sample());

        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&p, &bytes).unwrap();
        let e = read_state_file::<Machine>(&p).unwrap_err();
        let body = bytes.len() - HEADER_LEN;
        assert_eq!(
            e.to_string(),
            format!(
                "state file {} is truncated: header says {} body bytes, found {body}",
                p.display(),
                body + 5
            )
        );

        let missing = d.path().join("nope.bin");
        let e = read_state_file::<Machine>(&missing).unwrap_err();
        assert!(matches!(e, FormatError::Missing { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("state file {} is missing", missing.display())
        );
    }

    #[test]
    fn json_round_trip_missing_and_corrupt() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Manifest {
            id: String,
            vcpus: u32,
            parent: Option<String>,
        }
        let d = TestDir::new("json");
        let p = d.path().join("manifest.json");
        let m = Manifest {
            id: "snap-1".into(),
            vcpus: 2,
            parent: None,
        };
        write_json_file(&p, &m).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains("\n  \"id\": \"snap-1\""),
            "not pretty: {text}"
        );
        assert!(text.ends_with("}\n"));
        assert_eq!(read_json_file::<Manifest>(&p).unwrap(), m);

        std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        let e = read_json_file::<Manifest>(&p).unwrap_err();
        assert!(matches!(e, FormatError::JsonCorrupt { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("JSON file {} is corrupt: ", p.display())),
            "{e}"
        );

        let missing = d.path().join("gone.json");
        let e = read_json_file::<Manifest>(&missing).unwrap_err();
        assert!(matches!(e, FormatError::Missing { .. }), "{e}");
        assert!(e.to_string().ends_with("gone.json is missing"), "{e}");
    }

    #[test]
    fn write_state_file_into_missing_dir_names_path() {
        let d = TestDir::new("statemissingdir");
        let p = d.path().join("no-such-dir").join("state.bin");
        let e = write_state_file(&p, &sample()).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Io {
                    action: "write",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("cannot write state file {}: ", p.display())),
            "{e}"
        );
    }

    #[test]
    fn errors_are_one_line() {
        let bytes = encode_state(&sample()).unwrap();
        let e = decode_err(&bytes[..HEADER_LEN - 1]);
        assert!(!e.to_string().contains('\n'));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(!decode_err(&b).to_string().contains('\n'));
    }
}
