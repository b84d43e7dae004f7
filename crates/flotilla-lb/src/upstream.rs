//! The HTTP/1.1 client side of the proxy, run inside the task that serves the client.
//!
//! Why not hyper's client: its connection lives in a task of its own, so each request
//! crosses a channel and a oneshot and wakes two more tasks. On one core at tens of
//! thousands of requests per second that dispatch was the largest user-space cost left
//! (BENCHMARKS.md). Here the task that read the client's request writes it upstream,
//! reads the response head and streams the body straight out of the connection's
//! buffer; the connection goes back to its backend's pool the moment the body ends.
//!
//! Message framing follows RFC 9112 §6: no body for HEAD, 1xx, 204 and 304;
//! `Transfer-Encoding: chunked` (decoded here, re-framed by the server side);
//! `Content-Length`; otherwise the body runs to the end of the connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use tokio::io::AsyncWriteExt;

use crate::backend::{Backend, InFlight};
use crate::pool::Conn;

/// Error type of bodies flowing through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 * 1024;

/// How an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// A reused connection failed before anything of the response arrived and before
    /// any of the request body was consumed: the usual keep-alive close race.
    Stale(String),
    /// Anything else; the message names the cause.
    Failed(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Stale(m) | ExchangeError::Failed(m) => f.write_str(m),
        }
    }
}

/// A response head read from a backend.
pub struct ResponseHead {
    /// Status code.
    pub status: StatusCode,
    /// Headers as sent (hop-by-hop ones still present).
    pub headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes `method path HTTP/1.1`, `headers` and the body, then reads the response head.
/// 1xx interim responses other than 101 are skipped.
pub async fn exchange(
    conn: &mut Conn,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Option<Incoming>,
) -> Result<ResponseHead, ExchangeError> {
    let reused = conn.reused;
    // Body framing upstream: keep a declared length, chunk an unknown one.
    let declared = headers.contains_key(header::CONTENT_LENGTH);
    let body = body.filter(|b| !b.is_end_stream() || declared);
    let chunked = body.is_some() && !declared;
    encode_head(
        &mut conn.head,
        method,
        path,
        headers,
        chunked,
        body.is_none(),
    );
    if let Err(e) = conn.io.write_all(&conn.head).await {
        return Err(if reused {
            ExchangeError::Stale(format!("writing request: {e}"))
        } else {
            ExchangeError::Failed(format!("writing request: {e}"))
        });
    }
    let sent_body = body.is_some();
    if let Some(body) = body {
        if let Err(e) = write_body(conn, body, chunked).await {
            // A backend may answer early (413, 401) and close; prefer its answer.
            if let Ok(Some(head)) = read_head_once(conn, method).await {
                return Ok(head);
            }
            return Err(ExchangeError::Failed(e));
        }
    }
    match read_head(conn, method).await {
        Ok(head) => Ok(head),
        Err((e, nothing_read)) if reused && nothing_read && !sent_body => {
            Err(ExchangeError::Stale(e))
        }
        Err((e, _)) => Err(ExchangeError::Failed(e)),
    }
}

fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    chunked: bool,
    no_body: bool,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        // The server side already answered any `Expect: 100-continue`.
        if name == header::EXPECT {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if no_body
        && matches!(*method, Method::POST | Method::PUT | Method::PATCH)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        // Backends may insist on a length for methods that usually carry a body.
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

async fn write_body(conn: &mut Conn, mut body: Incoming, chunked: bool) -> Result<(), String> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading request body from client: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        let io = &mut conn.io;
        let written = if chunked {
            let size = format!("{:x}\r\n", data.len());
            async {
                io.write_all(size.as_bytes()).await?;
                io.write_all(&data).await?;
                io.write_all(b"\r\n").await
            }
            .await
        } else {
            io.write_all(&data).await
        };
        written.map_err(|e| format!("writing request body: {e}"))?;
    }
    if chunked {
        conn.io
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(|e| format!("writing request body: {e}"))?;
    }
    Ok(())
}

/// Reads more bytes into `conn.buf`; `Ok(0)` is the end of the connection.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(16 * 1024);
    }
    let filled = conn.buf.len();
    let n = ready!(crate::drain::poll_recv(
        conn.io.stream(),
        cx,
        conn.buf.spare_capacity_mut()
    ))?;
    // SAFETY: the kernel initialised the `n` bytes after the filled part.
    unsafe { conn.buf.set_len(filled + n) };
    Poll::Ready(Ok(n))
}

async fn fill(conn: &mut Conn) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_fill(conn, cx)).await
}

/// Reads until a final response head is complete. The error says whether nothing at all
/// had arrived (a stale keep-alive connection).
async fn read_head(conn: &mut Conn, method: &Method) -> Result<ResponseHead, (String, bool)> {
    let mut nothing_read = conn.buf.is_empty();
    loop {
        match parse_head(conn, method) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err((e, false)),
        }
        match fill(conn).await {
            Ok(0) => {
                return Err((
                    "backend closed the connection before a complete response head".into(),
                    nothing_read,
                ))
            }
            Ok(_) => nothing_read = false,
            Err(e) => return Err((format!("reading response: {e}"), nothing_read)),
        }
    }
}

/// One read attempt for a response already on its way (after a failed body write).
async fn read_head_once(conn: &mut Conn, method: &Method) -> Result<Option<ResponseHead>, String> {
    let _ = fill(conn).await;
    let mut head = parse_head(conn, method)?;
    if let Some(h) = head.as_mut() {
        h.keep_alive = false;
    }
    Ok(head)
}

/// Parses a final response head from the front of `conn.buf`, consuming it; `None`
/// while incomplete.
fn parse_head(conn: &mut Conn, method: &Method) -> Result<Option<ResponseHead>, String> {
    parse_response_head(&mut conn.buf, method)
}

/// Parses a backend's response head from the front of `buf` (consuming it, and any
/// 1xx interim heads before it): `Ok(None)` until the head is complete. Framing is
/// strict, because a proxy that guesses where a body ends hands the client a truncated
/// or smuggled response: `Content-Length` must be digits only and agree with any
/// repeat, `Transfer-Encoding` must end in `chunked`, and a response with both is
/// refused (each an error, which the caller answers as 502).
pub fn parse_response_head(
    buf: &mut bytes::BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, String> {
    loop {
        // Parse, keeping only where each header sits, so the buffer can be split after.
        let base = buf.as_ptr() as usize;
        let (n, code, http10, fields) = {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            let n = match parsed.parse(buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(format!("response head larger than {MAX_HEAD} bytes"))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(format!("malformed response head: {e}")),
            };
            let mut fields = Vec::with_capacity(parsed.headers.len());
            for h in parsed.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("bad header name {:?}", h.name))?;
                let at = h.value.as_ptr() as usize - base;
                fields.push((name, at, at + h.value.len()));
            }
            (
                n,
                parsed.code.unwrap_or(0),
                parsed.version == Some(0),
                fields,
            )
        };
        let status = StatusCode::from_u16(code).map_err(|_| format!("bad status code {code}"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(n);
            continue;
        }
        let raw = buf.split_to(n).freeze();
        let mut headers = HeaderMap::with_capacity(fields.len());
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut close = http10;
        for (name, from, to) in fields {
            let bytes = raw.slice(from..to);
            let value = HeaderValue::from_maybe_shared(bytes)
                .map_err(|_| format!("bad value of header {name}"))?;
            if name == header::CONTENT_LENGTH {
                let v = value
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("bad content-length {value:?}"))?;
                if length.is_some_and(|l| l != v) {
                    return Err("conflicting content-length headers".into());
                }
                length = Some(v);
            } else if name == header::TRANSFER_ENCODING {
                // Several headers are one list; what counts is the last coding.
                transfer_encoding = true;
                chunked = value
                    .to_str()
                    .map(|v| {
                        v.rsplit(',')
                            .next()
                            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
                    })
                    .unwrap_or(false);
            } else if name == header::CONNECTION {
                for token in value.to_str().unwrap_or("").split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        close = false;
                    }
                }
            }
            headers.append(name, value);
        }
        if transfer_encoding && length.is_some() {
            return Err("response has both transfer-encoding and content-length".into());
        }
        if transfer_encoding && !chunked {
            return Err("response transfer-encoding does not end in chunked".into());
        }
        let no_body = *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS;
        let framing = if no_body {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(l) = length {
            Framing::Length(l)
        } else {
            Framing::UntilClose
        };
        return Ok(Some(ResponseHead {
            status,
            headers,
            framing,
            keep_alive: !close && framing != Framing::UntilClose,
        }));
    }
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// A response body read straight from the upstream connection. When it ends the
/// connection returns to the backend's pool and the backend's in-flight count drops;
/// dropped early, the connection is closed.
pub struct UpstreamBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    backend: Arc<Backend>,
    guard: Option<InFlight>,
}

impl UpstreamBody {
    /// The body that follows `head` on `conn`.
    pub fn new(conn: Conn, head: &ResponseHead, backend: Arc<Backend>, guard: InFlight) -> Self {
        let state = match head.framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            backend,
            guard: Some(guard),
        };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// The response ended: reuse the connection if it is clean.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes past the end of the response mean the backend does not frame its
            // messages the way we think: never reuse such a connection.
            if self.keep_alive && conn.buf.is_empty() {
                self.backend.pool.push(conn);
            }
        }
        self.guard.take();
    }

    fn fail(&mut self, msg: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn.take();
        self.guard.take();
        Poll::Ready(Some(Err(msg.into())))
    }
}

/// Takes one line (without CR LF) off the front of `buf`, if a whole one is there.
fn take_line(buf: &mut bytes::BytesMut) -> Option<Bytes> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Some(line.freeze())
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next()?;
    let size = std::str::from_utf8(size).ok()?.trim();
    if size.is_empty() || size.len() > 15 {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Consume what is buffered; `need_more` asks for another read.
            let need_more = match this.state {
                State::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(rest) | State::Chunked(Chunk::Data(rest)) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(rest) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    let rest = rest - n as u64;
                    match &mut this.state {
                        State::Length(r) => {
                            *r = rest;
                            if rest == 0 {
                                this.finish();
                            }
                        }
                        s => {
                            *s = State::Chunked(if rest == 0 {
                                Chunk::DataEnd
                            } else {
                                Chunk::Data(rest)
                            })
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(Chunk::Size) => match take_line(&mut conn.buf) {
                    Some(line) => match chunk_size(&line) {
                        Some(0) => {
                            this.state = State::Chunked(Chunk::Trailers);
                            false
                        }
                        Some(n) => {
                            this.state = State::Chunked(Chunk::Data(n));
                            false
                        }
                        None => return this.fail(format!("bad chunk size line {line:?}")),
                    },
                    None if conn.buf.len() > MAX_LINE => {
                        return this.fail("chunk size line too long".into())
                    }
                    None => true,
                },
                State::Chunked(Chunk::DataEnd) => match take_line(&mut conn.buf) {
                    Some(line) if line.is_empty() => {
                        this.state = State::Chunked(Chunk::Size);
                        false
                    }
                    Some(_) => return this.fail("chunk data longer than its size".into()),
                    None => true,
                },
                State::Chunked(Chunk::Trailers) => match take_line(&mut conn.buf) {
                    Some(line) if line.is_empty() => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Some(_) => false, // trailer fields are dropped
                    None if conn.buf.len() > MAX_LINE => {
                        return this.fail("trailer line too long".into())
                    }
                    None => true,
                },
                State::Length(_) | State::Chunked(Chunk::Data(_)) | State::UntilClose => true,
            };
            if need_more {
                match ready!(poll_fill(conn, cx)) {
                    Ok(0) if matches!(this.state, State::UntilClose) => {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => {
                        return this
                            .fail("backend closed the connection in the middle of the body".into())
                    }
                    Ok(_) => {}
                    Err(e) => return this.fail(format!("reading response body: {e}")),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Joins an upgraded client connection to the backend connection that answered 101.
pub fn tunnel(client: hyper::upgrade::OnUpgrade, mut conn: Conn) {
    tokio::spawn(async move {
        let upgraded = match client.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        // Bytes the backend sent right after its 101 belong to the new protocol.
        if !conn.buf.is_empty() {
            let early = conn.buf.split();
            if client.write_all(&early).await.is_err() {
                return;
            }
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut conn.io).await {
            tracing::debug!(error = %e, "upgraded tunnel ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<ResponseHead>, String> {
        let mut buf = bytes::BytesMut::from(raw.as_bytes());
        parse_response_head(&mut buf, &Method::GET)
    }

    #[test]
    fn response_framing_is_strict() {
        let ok = |raw: &str| head(raw).unwrap().unwrap().framing;
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length:  5 \r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            Framing::Length(0)
        );
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-").unwrap().is_none(),
            "partial"
        );
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n",
            "HTTP/1.1 999x OK\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"ff;name=value"), Some(255));
        assert_eq!(chunk_size(b" 10 "), Some(16));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"zz"), None);
        assert_eq!(chunk_size(b"ffffffffffffffff0"), None);
    }

    #[test]
    fn lines() {
        let mut b = bytes::BytesMut::from(&b"abc\r\ndef\nrest"[..]);
        assert_eq!(take_line(&mut b).as_deref(), Some(&b"abc"[..]));
        assert_eq!(take_line(&mut b).as_deref(), Some(&b"def"[..]));
        assert_eq!(take_line(&mut b), None);
        assert_eq!(&b[..], b"rest");
    }

    #[test]
    fn head_encoding() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let mut out = Vec::new();
        encode_head(&mut out, &Method::POST, "/a?b", &h, false, true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST /a?b HTTP/1.1\r\nhost: example\r\ncontent-length: 0\r\n\r\n"
        );
        encode_head(&mut out, &Method::PUT, "/", &h, true, false);
        assert!(std::str::from_utf8(&out)
            .unwrap()
            .ends_with("transfer-encoding: chunked\r\n\r\n"));
    }
}
