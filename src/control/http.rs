//! Minimal, strict HTTP/1.1 message parsing and writing.
//!
//! Only what the control socket needs: one request per connection, bodies
//! framed by `Content-Length`, JSON payloads. Anything outside that subset is
//! rejected with an error that maps to a sensible status code rather than
//! being guessed at, because the peer is a local tool and a clear refusal
//! beats silently misreading a request that could stop or revert a VM.

use std::io::{self, Read, Write};

/// Upper bound for the request line plus headers, including the blank line.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Upper bound for a request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Upper bound for a response body read by the client; snapshot listings may
/// legitimately outgrow the request limit.
pub const MAX_RESPONSE_BODY_BYTES: usize = 16 * 1024 * 1024;

const READ_CHUNK: usize = 4096;

/// A parsed HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method token as sent, e.g. `GET`.
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Headers in order of appearance; names are lowercased.
    pub headers: Vec<(String, String)>,
    /// Body bytes (empty when no `Content-Length` was sent).
    pub body: Vec<u8>,
}

impl Request {
    /// First value of the header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A parsed HTTP response, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code (100..=599).
    pub status: u16,
    /// Headers in order of appearance; names are lowercased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

#[cfg(test)]
impl Response {
    /// First value of the header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Why a message could not be read.
#[derive(thiserror::Error, Debug)]
pub enum HttpError {
    /// The peer closed the connection before sending anything.
    #[error("the connection was closed before a message was sent")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("the connection was closed before the message was complete")]
    Truncated,
    /// A read timed out before the message was complete.
    #[error("timed out waiting for the rest of the message")]
    Timeout,
    /// Any other I/O failure.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// Request line plus headers exceed [`MAX_HEAD_BYTES`].
    #[error("the message headers exceed {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The body exceeds the applicable limit.
    #[error("the message body of {len} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// Announced (or already received) body length.
        len: u64,
        /// The limit that was exceeded.
        limit: usize,
    },
    /// `Content-Length` is not a single non-negative decimal number.
    #[error("the Content-Length header is not a valid decimal length")]
    BadContentLength,
    /// `Transfer-Encoding` (e.g. chunked) was used.
    #[error("Transfer-Encoding is not supported; send the body with Content-Length")]
    TransferEncoding,
    /// The HTTP version is not 1.0 or 1.1.
    #[error("HTTP version {0} is not supported; use HTTP/1.1")]
    UnsupportedVersion(String),
    /// Any other syntax error; the text is a complete sentence.
    #[error("{0}")]
    Malformed(&'static str),
}

impl HttpError {
    /// Status code to answer with, or `None` when the peer is gone or
    /// nothing useful can be said.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Closed | HttpError::Io(_) => None,
            HttpError::Timeout => Some(408),
            HttpError::Truncated | HttpError::BadContentLength | HttpError::Malformed(_) => {
                Some(400)
            }
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge { .. } => Some(413),
            HttpError::TransferEncoding => Some(411),
            HttpError::UnsupportedVersion(_) => Some(505),
        }
    }
}

/// Reads and parses one request from `r`.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, HttpError> {
    let (head, rest) = read_head(r)?;
    let mut lines = head.split("\r\n");
    let (method, path) = parse_request_line(lines.next().unwrap_or(""))?;
    let headers = parse_headers(lines)?;
    let body = match body_length(&headers, MAX_BODY_BYTES)? {
        Some(len) => read_exact_body(r, rest, len)?,
        None => Vec::new(),
    };
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        body,
    })
}

/// Reads and parses one response from `r`. Without `Content-Length` the body
/// extends to end of stream, as the server always closes the connection.
pub fn read_response<R: Read>(r: &mut R) -> Result<Response, HttpError> {
    let (head, rest) = read_head(r)?;
    let mut lines = head.split("\r\n");
    let status = parse_status_line(lines.next().unwrap_or(""))?;
    let headers = parse_headers(lines)?;
    let body = if status == 204 || status == 304 || status < 200 {
        Vec::new()
    } else {
        match body_length(&headers, MAX_RESPONSE_BODY_BYTES)? {
            Some(len) => read_exact_body(r, rest, len)?,
            None => read_body_to_eof(r, rest, MAX_RESPONSE_BODY_BYTES)?,
        }
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Checks that `method` and `path` form a request line that
/// [`read_request`] accepts, so a client never emits a request that is
/// malformed or smuggles extra header lines.
pub fn check_request_target(method: &str, path: &str) -> Result<(), HttpError> {
    parse_request_line(&format!("{method} {path} HTTP/1.1")).map(|_| ())
}

/// Writes a request with an optional JSON body. Callers should validate
/// `method` and `path` with [`check_request_target`] first.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    )
    .into_bytes();
    if let Some(body) = body {
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n");
    }
    w.write_all(&out)?;
    w.flush()
}

/// Writes a complete response with a JSON body and `Connection: close`.
/// A status outside 200..=599 is sent as 500 because it would otherwise
/// produce a response the client cannot interpret.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    body: &serde_json::Value,
) -> io::Result<()> {
    let status = if (200..=599).contains(&status) {
        status
    } else {
        500
    };
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    if status == 204 || status == 304 {
        // These statuses must not carry a body.
        out.extend_from_slice(b"Connection: close\r\n\r\n");
    } else {
        let mut payload = serde_json::to_vec(body).map_err(io::Error::other)?;
        // A trailing newline keeps a shell prompt off the JSON in `curl` output.
        payload.push(b'\n');
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                payload.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&payload);
    }
    w.write_all(&out)?;
    w.flush()
}

/// Standard reason phrase for `status`, or a generic one per class.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One `read` that retries on EINTR and classifies timeouts.
fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, HttpError> {
    loop {
        match r.read(buf) {
            // A broken reader claiming more than the buffer must not make us slice out of bounds.
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout);
            }
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Reads up to and including the blank line ending the head. Returns the head
/// (without the final CRLFCRLF) and any body bytes that arrived with it.
fn read_head<R: Read>(r: &mut R) -> Result<(String, Vec<u8>), HttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let n = read_some(r, &mut chunk)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HttpError::Closed
            } else {
                HttpError::Truncated
            });
        }
        // The terminator may straddle two reads.
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        let found = buf
            .get(scan_from..)
            .and_then(|tail| tail.windows(4).position(|w| w == b"\r\n\r\n"))
            .map(|p| p + scan_from);
        match found {
            Some(end) if end + 4 > MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
            Some(end) => {
                let rest = buf.split_off(end + 4);
                buf.truncate(end);
                let head = String::from_utf8(buf)
                    .map_err(|_| HttpError::Malformed("the message head is not valid UTF-8"))?;
                return Ok((head, rest));
            }
            None if buf.len() >= MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
            None => {}
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_line(line: &str) -> Result<(), HttpError> {
    if line.bytes().any(|b| b == b'\r' || b == b'\n') {
        Err(HttpError::Malformed(
            "lines must end with CRLF; a bare CR or LF is not allowed",
        ))
    } else {
        Ok(())
    }
}

fn check_version(version: &str) -> Result<(), HttpError> {
    match version {
        "HTTP/1.1" | "HTTP/1.0" => Ok(()),
        v if v.starts_with("HTTP/") => {
            Err(HttpError::UnsupportedVersion(v.chars().take(16).collect()))
        }
        _ => Err(HttpError::Malformed(
            "the protocol version is missing or malformed",
        )),
    }
}

/// Returns `(method, path)` with the query string removed.
fn parse_request_line(line: &str) -> Result<(&str, &str), HttpError> {
    check_line(line)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "the request line must look like `METHOD /path HTTP/1.1`",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HttpError::Malformed(
            "the request method is empty or contains invalid characters",
        ));
    }
    check_version(version)?;
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "the request target must be a path starting with '/'",
        ));
    }
    if !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(HttpError::Malformed(
            "the request target contains invalid characters",
        ));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok((method, path))
}

fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    check_line(line)?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    check_version(version)?;
    let code = parts.next().unwrap_or("");
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed(
            "the status line does not contain a three-digit status code",
        ));
    }
    match code.parse::<u16>() {
        Ok(status) if (100..=599).contains(&status) => Ok(status),
        _ => Err(HttpError::Malformed("the status code is out of range")),
    }
}

fn parse_headers<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    for line in lines {
        check_line(line)?;
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed("folded header lines are not allowed"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed("a header line has no ':'"));
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(HttpError::Malformed(
                "a header name is empty or contains invalid characters",
            ));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(HttpError::Malformed(
                "a header value contains control characters",
            ));
        }
        headers.push((name.to_ascii_lowercase(), value.to_string()));
    }
    Ok(headers)
}

/// Body length announced by the headers, `None` if there is no
/// `Content-Length`.
fn body_length(headers: &[(String, String)], limit: usize) -> Result<Option<usize>, HttpError> {
    if find_header(headers, "transfer-encoding").is_some() {
        return Err(HttpError::TransferEncoding);
    }
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::BadContentLength);
        }
        let n: u64 = value.parse().map_err(|_| HttpError::BadContentLength)?;
        // Differing duplicates are the classic request-smuggling vector.
        if length.is_some_and(|prev| prev != n) {
            return Err(HttpError::BadContentLength);
        }
        length = Some(n);
    }
    match length {
        None => Ok(None),
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= limit => Ok(Some(n)),
            _ => Err(HttpError::BodyTooLarge { len: n, limit }),
        },
    }
}

fn read_exact_body<R: Read>(
    r: &mut R,
    mut body: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>, HttpError> {
    // Bytes past the body would belong to a pipelined message, which we do
    // not serve since every connection carries a single exchange.
    body.truncate(len);
    body.reserve_exact(len.saturating_sub(body.len()));
    let mut chunk = [0u8; READ_CHUNK];
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK);
        let n = read_some(r, chunk.get_mut(..want).unwrap_or(&mut []))?;
        if n == 0 {
            return Err(HttpError::Truncated);
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
    Ok(body)
}

fn read_body_to_eof<R: Read>(
    r: &mut R,
    mut body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if body.len() > limit {
            return Err(HttpError::BodyTooLarge {
                len: body.len() as u64,
                limit,
            });
        }
        let n = read_some(r, &mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut Cursor::new(raw.to_vec()))
    }

    /// Hands out at most one byte per read, to exercise reassembly.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    /// Yields its data, then fails like a socket whose read timeout expired.
    struct Stall(Cursor<Vec<u8>>);
    impl Read for Stall {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(io::Error::from(io::ErrorKind::WouldBlock)),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn parses_curl_style_get() {
        let req = parse(
            b"GET /vm?pretty=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/vm");
        assert_eq!(req.header("HOST"), Some("localhost"));
        assert_eq!(req.header("user-agent"), Some("curl/7.88.1"));
        assert_eq!(req.header("x-missing"), None);
        assert!(req.body.is_empty());
    }

    #[test]
    fn parses_body_and_ignores_trailing_bytes() {
        let req = parse(
            b"PUT /snapshots HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\ncontent-LENGTH:  13 \r\n\r\n{\"name\":\"a\"}\nGARBAGE",
        )
        .unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.body, b"{\"name\":\"a\"}\n");
    }

    #[test]
    fn reassembles_one_byte_reads() {
        let raw = b"PUT /snapshots HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
        let req = read_request(&mut Trickle(raw)).unwrap();
        assert_eq!(req.path, "/snapshots");
        assert_eq!(req.body, b"abcd");
    }

    #[test]
    fn reads_body_larger_than_one_chunk() {
        let body = vec![b'x'; READ_CHUNK * 3 + 17];
        let mut raw =
            format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(&body);
        assert_eq!(parse(&raw).unwrap().body, body);
    }

    #[test]
    fn empty_connection_is_closed_not_malformed() {
        let err = parse(b"").unwrap_err();
        assert!(matches!(err, HttpError::Closed));
        assert_eq!(err.status(), None);
    }

    #[test]
    fn truncated_head_and_body() {
        assert!(matches!(
            parse(b"GET /vm HTTP/1.1\r\nHost: x\r\n").unwrap_err(),
            HttpError::Truncated
        ));
        let err = parse(b"PUT /snapshots HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").unwrap_err();
        assert!(matches!(err, HttpError::Truncated));
        assert_eq!(err.status(), Some(400));
    }

    #[test]
    fn oversize_head_is_431() {
        let mut raw = b"GET /vm HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        raw.extend_from_slice(b"\r\n\r\n");
        let err = parse(&raw).unwrap_err();
        assert!(matches!(err, HttpError::HeadTooLarge));
        assert_eq!(err.status(), Some(431));
        // Without a terminator at all, reading must stop at the limit too.
        let raw = vec![b'a'; MAX_HEAD_BYTES * 4];
        assert!(matches!(parse(&raw).unwrap_err(), HttpError::HeadTooLarge));
    }

    #[test]
    fn head_exactly_at_limit_is_accepted() {
        let prefix = b"GET /vm HTTP/1.1\r\nX-Pad: ";
        let pad = MAX_HEAD_BYTES - prefix.len() - 4;
        let mut raw = prefix.to_vec();
        raw.extend(std::iter::repeat_n(b'a', pad));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(raw.len(), MAX_HEAD_BYTES);
        assert!(parse(&raw).is_ok());
        let mut longer = prefix.to_vec();
        longer.extend(std::iter::repeat_n(b'a', pad + 1));
        longer.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            parse(&longer).unwrap_err(),
            HttpError::HeadTooLarge
        ));
    }

    #[test]
    fn oversize_body_is_413_before_reading_it() {
        let raw = format!(
            "PUT /snapshots HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let err = parse(raw.as_bytes()).unwrap_err();
        assert!(
            matches!(err, HttpError::BodyTooLarge { len, .. } if len == MAX_BODY_BYTES as u64 + 1)
        );
        assert_eq!(err.status(), Some(413));
    }

    #[test]
    fn bad_content_lengths() {
        for cl in [
            "abc",
            "-1",
            "+5",
            "5 5",
            "5,5",
            "",
            "0x10",
            "99999999999999999999999",
        ] {
            let raw = format!("PUT /snapshots HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n");
            let err = parse(raw.as_bytes()).unwrap_err();
            assert!(
                matches!(err, HttpError::BadContentLength),
                "{cl:?}: {err:?}"
            );
            assert_eq!(err.status(), Some(400));
        }
        let err = parse(b"PUT /s HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
            .unwrap_err();
        assert!(matches!(err, HttpError::BadContentLength));
        // Identical duplicates are harmless.
        let ok =
            parse(b"PUT /s HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab").unwrap();
        assert_eq!(ok.body, b"ab");
    }

    #[test]
    fn chunked_is_rejected_with_411() {
        let err = parse(
            b"PUT /snapshots HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .unwrap_err();
        assert!(matches!(err, HttpError::TransferEncoding));
        assert_eq!(err.status(), Some(411));
        assert!(err.to_string().contains("Content-Length"));
    }

    #[test]
    fn malformed_request_lines() {
        let cases: &[&[u8]] = &[
            b"\r\n\r\n",
            b"GET /vm\r\n\r\n",
            b"GET  /vm HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1 extra\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET http://localhost/vm HTTP/1.1\r\n\r\n",
            b"G(T /vm HTTP/1.1\r\n\r\n",
            b"GET /vm FTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\nHost: x\r\n\r\n",
            b"GET /v\x01m HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nA: b\x7fc\r\n\r\n",
            b"GET /vm HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ];
        for raw in cases {
            let err = parse(raw).unwrap_err();
            assert_eq!(
                err.status(),
                Some(400),
                "{:?}: {err:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn unsupported_version_is_505() {
        let err = parse(b"GET /vm HTTP/2.0\r\n\r\n").unwrap_err();
        assert!(matches!(err, HttpError::UnsupportedVersion(ref v) if v == "HTTP/2.0"));
        assert_eq!(err.status(), Some(505));
        assert!(parse(b"GET /vm HTTP/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn stalled_peer_is_a_timeout() {
        let mut r = Stall(Cursor::new(b"GET /vm HTTP/1.1\r\n".to_vec()));
        let err = read_request(&mut r).unwrap_err();
        assert!(matches!(err, HttpError::Timeout));
        assert_eq!(err.status(), Some(408));
    }

    #[test]
    fn response_format() {
        let mut out = Vec::new();
        write_response(&mut out, 404, &serde_json::json!({"error": "x"})).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"error\":\"x\"}\n"
        );
    }

    #[test]
    fn response_status_edge_cases() {
        let mut out = Vec::new();
        write_response(&mut out, 204, &serde_json::json!({"ignored": true})).unwrap();
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        assert_eq!(reason(299), "Success");
        assert_eq!(reason(418), "Client Error");
        for bogus in [0, 42, 101, 600, u16::MAX] {
            let mut out = Vec::new();
            write_response(&mut out, bogus, &serde_json::Value::Null).unwrap();
            assert!(
                out.starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"),
                "{bogus}"
            );
        }
    }

    #[test]
    fn response_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, 200, &serde_json::json!({"state": "running"})).unwrap();
        let resp = read_response(&mut Trickle(&out)).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v, serde_json::json!({"state": "running"}));
    }

    #[test]
    fn response_without_length_reads_to_eof() {
        let resp = read_response(&mut Cursor::new(b"HTTP/1.1 200 OK\r\n\r\n{}".to_vec())).unwrap();
        assert_eq!(resp.body, b"{}");
        let resp = read_response(&mut Cursor::new(
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        ))
        .unwrap();
        assert!(resp.body.is_empty());
    }

    #[test]
    fn malformed_responses() {
        for raw in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        ] {
            assert!(
                read_response(&mut Cursor::new(raw.to_vec())).is_err(),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn request_written_by_client_parses_back() {
        let mut out = Vec::new();
        write_request(&mut out, "PUT", "/snapshots", Some(b"{\"name\":\"s1\"}")).unwrap();
        let req = parse(&out).unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/snapshots");
        assert_eq!(req.body, b"{\"name\":\"s1\"}");
        let mut out = Vec::new();
        write_request(&mut out, "GET", "/vm", None).unwrap();
        assert!(parse(&out).unwrap().body.is_empty());
    }

    #[test]
    fn request_target_check_blocks_injection() {
        assert!(check_request_target("GET", "/vm").is_ok());
        assert!(check_request_target("GET", "/vm HTTP/1.1\r\nX: y").is_err());
        assert!(check_request_target("GET", "vm").is_err());
        assert!(check_request_target("G ET", "/vm").is_err());
        assert!(check_request_target("", "/vm").is_err());
    }
}
