//! The Connect protocol as E2B's SDKs speak it to envd: JSON codec only,
//! unary calls as plain `application/json` bodies, streams as
//! `application/connect+json` envelopes (a flags byte, a 4-byte big-endian
//! length, the JSON message), ended by an end-of-stream envelope (flags
//! `0x02`) that carries `{}` or `{"error": {code, message}}`.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
const FLAG_END: u8 = 0x02;
const FLAG_COMPRESSED: u8 = 0x01;
/// Largest single message a client may send (an input chunk, a request).
pub const MAX_MESSAGE: usize = 4 << 20;

/// A Connect error: a code from the protocol's list and a message.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new("invalid_argument", message)
    }

    pub fn unimplemented(message: impl Into<String>) -> RpcError {
        RpcError::new("unimplemented", message)
    }

    fn http_status(&self) -> StatusCode {
        match self.code {
            "invalid_argument" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" | "failed_precondition" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }

    /// The end-of-stream envelope that reports this error.
    pub fn end_frame(&self) -> Bytes {
        frame(FLAG_END, &json!({"error": self.body()}))
    }
}

/// A unary error: an HTTP status and `{code, message}`, which both of the
/// SDK's Connect clients map back to the code.
impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (
            self.http_status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.body().to_string(),
        )
            .into_response()
    }
}

/// One envelope.
pub fn frame(flags: u8, message: &Value) -> Bytes {
    let payload = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out.into()
}

/// A data envelope.
pub fn message(value: &Value) -> Bytes {
    frame(0, value)
}

/// The end-of-stream envelope of a stream that ended well. It must be `{}`:
/// E2B's first 2.x SDKs test for the key `error`, not for its value.
pub fn end_ok() -> Bytes {
    frame(FLAG_END, &json!({}))
}

/// Whether a request is a streaming one (enveloped).
pub fn is_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(STREAM_CONTENT_TYPE))
}

/// Split an enveloped body into its messages (the end-of-stream envelope, if
/// a client sends one, ends the list).
pub fn decode_envelopes(mut body: &[u8]) -> Result<Vec<Value>, RpcError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(RpcError::invalid("a truncated Connect envelope"));
        }
        let flags = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                "resource_exhausted",
                format!("a message of {len} bytes; the limit is {MAX_MESSAGE}"),
            ));
        }
        if body.len() < 5 + len {
            return Err(RpcError::invalid("a truncated Connect envelope"));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(RpcError::unimplemented(
                "compressed Connect messages are not supported; send identity encoding",
            ));
        }
        let payload = &body[5..5 + len];
        body = &body[5 + len..];
        if flags & FLAG_END != 0 {
            break;
        }
        out.push(parse_json(payload)?);
    }
    Ok(out)
}

/// A reader of envelopes from a request body as it arrives (client streams).
pub struct EnvelopeReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for EnvelopeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeReader")
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish()
    }
}

impl EnvelopeReader {
    pub fn new(body: Body) -> EnvelopeReader {
        EnvelopeReader {
            body: body.into_data_stream(),
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next message, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Value>, RpcError> {
        use futures::StreamExt;
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError::new(
                        "resource_exhausted",
                        format!("a message of {len} bytes; the limit is {MAX_MESSAGE}"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    let payload: Vec<u8> = self.buf.drain(..5 + len).skip(5).collect();
                    if flags & FLAG_END != 0 {
                        self.done = true;
                        return Ok(None);
                    }
                    if flags & FLAG_COMPRESSED != 0 {
                        return Err(RpcError::unimplemented(
                            "compressed Connect messages are not supported",
                        ));
                    }
                    return parse_json(&payload).map(Some);
                }
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RpcError::invalid("a truncated Connect envelope"))
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(RpcError::new(
                        "canceled",
                        format!("the request body broke off: {e}"),
                    ));
                }
                None => self.done = true,
            }
        }
    }
}

fn parse_json(payload: &[u8]) -> Result<Value, RpcError> {
    if payload.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(payload)
        .map_err(|e| RpcError::invalid(format!("the message is not JSON: {e}")))
}

/// The one request message of a unary or server-streaming call.
pub fn request_message(headers: &HeaderMap, body: &Bytes) -> Result<Value, RpcError> {
    if is_stream(headers) {
        decode_envelopes(body)?
            .into_iter()
            .next()
            .ok_or_else(|| RpcError::invalid("a streaming call needs one request message"))
    } else {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        if !ct.starts_with("application/json") {
            return Err(RpcError::unimplemented(format!(
                "content type {ct:?}: Ember speaks Connect with the JSON codec only"
            )));
        }
        parse_json(body)
    }
}

/// A unary reply.
pub fn unary(value: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// A streaming reply from a stream of ready envelopes.
pub fn stream_response(frames: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, STREAM_CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

/// A field by its JSON name or its proto name (Connect clients may send
/// either).
pub fn field<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel)
        .or_else(|| v.get(snake))
        .filter(|x| !x.is_null())
}

/// A `bytes` field: standard or URL-safe base64, padded or not.
pub fn bytes_field(v: &Value) -> Result<Vec<u8>, RpcError> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let s = v
        .as_str()
        .ok_or_else(|| RpcError::invalid("a bytes field must be a base64 string"))?
        .trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .map_err(|e| RpcError::invalid(format!("a bytes field is not base64: {e}")))
}

/// A uint32 field sent as a number or a string.
pub fn u32_field(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `Connect-Timeout-Ms`, leniently (E2B 2.0.0 may send `"30000.0"`).
pub fn timeout_ms(headers: &HeaderMap) -> Option<u64> {
    let raw = headers.get("connect-timeout-ms")?.to_str().ok()?;
    raw.parse::<u64>()
        .ok()
        .or_else(|| raw.parse::<f64>().ok().map(|f| f.max(0.0) as u64))
        .filter(|ms| *ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_the_end_envelope_stops_the_list() {
        let mut body = message(&json!({"a": 1})).to_vec();
        body.extend_from_slice(&message(&json!({"b": "x"})));
        body.extend_from_slice(&end_ok());
        body.extend_from_slice(&message(&json!({"after": "end"})));
        let got = decode_envelopes(&body).unwrap();
        assert_eq!(got, vec![json!({"a": 1}), json!({"b": "x"})]);
        assert_eq!(&end_ok()[..], b"\x02\x00\x00\x00\x02{}");
    }

    #[test]
    fn truncated_compressed_and_oversized_envelopes_are_refused() {
        let whole = message(&json!({"a": 1}));
        assert_eq!(
            decode_envelopes(&whole[..whole.len() - 1])
                .unwrap_err()
                .code,
            "invalid_argument"
        );
        let mut compressed = whole.to_vec();
        compressed[0] = FLAG_COMPRESSED;
        assert_eq!(
            decode_envelopes(&compressed).unwrap_err().code,
            "unimplemented"
        );
        let mut huge = vec![0u8];
        huge.extend_from_slice(&(MAX_MESSAGE as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_envelopes(&huge).unwrap_err().code,
            "resource_exhausted"
        );
    }

    #[test]
    fn errors_end_a_stream_and_map_to_http_statuses() {
        let e = RpcError::new("not_found", "no process 7");
        let f = e.end_frame();
        assert_eq!(f[0], FLAG_END);
        let body: Value = serde_json::from_slice(&f[5..]).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(e.into_response().status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn lenient_scalars() {
        assert_eq!(bytes_field(&json!("aGk=")).unwrap(), b"hi");
        assert_eq!(bytes_field(&json!("aGk")).unwrap(), b"hi");
        assert_eq!(bytes_field(&json!("-_8")).unwrap(), vec![0xfb, 0xff]);
        assert!(bytes_field(&json!(3)).is_err());
        assert_eq!(u32_field(&json!("42")), Some(42));
        assert_eq!(u32_field(&json!(42)), Some(42));
        let mut h = HeaderMap::new();
        h.insert("connect-timeout-ms", "30000.0".parse().unwrap());
        assert_eq!(timeout_ms(&h), Some(30000));
        h.insert("connect-timeout-ms", "0".parse().unwrap());
        assert_eq!(timeout_ms(&h), None);
    }
}
