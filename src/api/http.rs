//! HTTP/1.x framing for the API socket: finding the next whole request in a connection's
//! bytes (the head parsed by `httparse`, the body bounded by `Content-Length`) and
//! writing responses the way Firecracker's server does: `HTTP/1.1` status lines,
//! `Connection: keep-alive`, JSON bodies with a `Content-Length`, and 204 answers with
//! no body and no length. Pure functions of their input; `mod.rs` does the socket I/O.

use super::action::ApiError;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 32;
/// Firecracker's default `--http-api-max-payload-size`: 50 KiB.
pub const DEFAULT_MAX_BODY: usize = 51200;

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// `None` when the request has no body (no `Content-Length`, or 0).
    pub body: Option<Vec<u8>>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// Not a whole request yet. `awaits_body_continue` is true when the head is complete
    /// and asked for `100 Continue` before the client sends the body.
    Incomplete { awaits_body_continue: bool },
    /// A whole request, taking the first `consumed` bytes.
    Request {
        request: HttpRequest,
        consumed: usize,
    },
}

/// Finds the first request in `buf`. An error means the stream cannot be followed any
/// further: answer it, then close the connection.
pub fn next_request(buf: &[u8], max_body: usize) -> Result<Framing, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
            return Ok(Framing::Incomplete {
                awaits_body_continue: false,
            })
        }
        Ok(_) => {
            return Err(ApiError::Http(format!(
                "the request head is longer than {MAX_HEAD} bytes"
            )))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::Http(format!("more than {MAX_HEADERS} headers")))
        }
        Err(e) => return Err(ApiError::Http(e.to_string())),
    };
    let method = request.method.unwrap_or_default().to_string();
    let path = request.path.unwrap_or_default().to_string();

    let mut content_length: Option<usize> = None;
    let mut close = false;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| ApiError::Http(format!("header {} is not text", header.name)))?
            .trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value
                .parse()
                .map_err(|_| ApiError::Http(format!("invalid Content-Length \"{value}\"")))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(ApiError::Http("conflicting Content-Length headers".into()));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("identity") {
                return Err(ApiError::Http(format!(
                    "Transfer-Encoding \"{value}\" is not supported: send a Content-Length"
                )));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"));
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiError::Http(format!("unsupported Expect \"{value}\"")));
            }
            expect_continue = true;
        }
    }

    let length = content_length.unwrap_or(0);
    if length > max_body {
        return Err(ApiError::BodyTooLarge {
            size: length,
            limit: max_body,
        });
    }
    let available = buf.len() - head_len;
    if available < length {
        return Ok(Framing::Incomplete {
            awaits_body_continue: expect_continue && available == 0,
        });
    }
    let body = (length > 0).then(|| buf[head_len..head_len + length].to_vec());
    Ok(Framing::Request {
        request: HttpRequest {
            method,
            path,
            body,
            close,
        },
        consumed: head_len + length,
    })
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A whole response. `body` is JSON; `None` only for 204. `close` announces that the
/// server closes the connection after it.
pub fn render_response(status: u16, body: Option<&str>, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: hearth API\r\nConnection: {}\r\n",
        reason(status),
        if close { "close" } else { "keep-alive" }
    );
    if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        out.push_str(body);
    } else {
        out.push_str("\r\n");
    }
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(buf: &[u8]) -> (HttpRequest, usize) {
        match next_request(buf, DEFAULT_MAX_BODY).unwrap() {
            Framing::Request { request, consumed } => (request, consumed),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn frames_requests_with_and_without_bodies() {
        let (get, used) = request(b"GET / HTTP/1.0\r\n\r\nGET /version HTTP/1.1\r\n\r\n");
        assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", "/"));
        assert_eq!((get.body, get.close, used), (None, false, 18));

        let put = b"PUT /vm HTTP/1.1\r\nContent-Length: 4\r\nConnection: Close\r\n\r\n{}{}extra";
        let (put_rq, used) = request(put);
        assert_eq!(put_rq.body.as_deref(), Some(&b"{}{}"[..]));
        assert!(put_rq.close);
        assert_eq!(&put[used..], b"extra");
    }

    #[test]
    fn waits_for_the_rest_and_for_continue() {
        let partial = next_request(b"PUT /vm HTTP/1.1\r\nContent-Le", 100).unwrap();
        assert_eq!(
            partial,
            Framing::Incomplete {
                awaits_body_continue: false
            }
        );
        let head = b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(
            next_request(head, 100).unwrap(),
            Framing::Incomplete {
                awaits_body_continue: true
            }
        );
        let mut half = head.to_vec();
        half.push(b'{');
        assert_eq!(
            next_request(&half, 100).unwrap(),
            Framing::Incomplete {
                awaits_body_continue: false
            }
        );
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        let cases: &[(&[u8], &str)] = &[
            (b"garbage\r\n\r\n", "malformed HTTP request"),
            (b"GET / HTTP/2.0\r\n\r\n", "malformed HTTP request"),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n",
                "51201 bytes, more than the 51200",
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting",
            ),
            (
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "send a Content-Length",
            ),
            (
                b"PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n",
                "unsupported Expect",
            ),
        ];
        for (bytes, expected) in cases {
            let err = next_request(bytes, DEFAULT_MAX_BODY).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let err = next_request(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 10);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("more than 32 headers"));
        let long = vec![b'a'; MAX_HEAD + 1];
        let err = next_request(&long, 10).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn responses_look_like_firecracker_ones() {
        let empty = String::from_utf8(render_response(204, None, false)).unwrap();
        assert_eq!(
            empty,
            "HTTP/1.1 204 No Content\r\nServer: hearth API\r\nConnection: keep-alive\r\n\r\n"
        );
        let fault = String::from_utf8(render_response(400, Some("{\"a\":1}"), true)).unwrap();
        assert!(fault.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(fault.contains("Connection: close\r\n"));
        assert!(fault.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"));
    }
}
