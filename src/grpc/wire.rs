//! tonic's own answers to requests it cannot take, in the codes this API documents: a message
//! over the decode limit is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE), and one that does not
//! decode (a `claims` Struct nested past protobuf's recursion limit, say) is INVALID_ARGUMENT
//! (tonic says INTERNAL). Handlers never answer either code themselves.

use http::HeaderValue;

/// Rewrites the status of a trailers-only gRPC response (how tonic refuses a request).
pub fn request_errors<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let code = headers.get("grpc-status").map(HeaderValue::as_bytes);
    let message = headers
        .get("grpc-message")
        .map_or(&b""[..], HeaderValue::as_bytes);
    let undecodable = message.starts_with(b"failed to decode Protobuf message")
        || message.starts_with(b"failed%20to%20decode%20Protobuf%20message");
    let rewritten = match code {
        Some(b"11") => Some(tonic::Code::ResourceExhausted),
        Some(b"13") if undecodable => Some(tonic::Code::InvalidArgument),
        _ => None,
    };
    if let Some(code) = rewritten {
        headers.insert("grpc-status", HeaderValue::from(code as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str, message: &str) -> http::Response<()> {
        http::Response::builder()
            .header("grpc-status", code)
            .header("grpc-message", message)
            .body(())
            .unwrap()
    }

    fn status(r: http::Response<()>) -> String {
        r.headers()["grpc-status"].to_str().unwrap().to_owned()
    }

    #[test]
    fn oversized_and_undecodable_requests_get_the_documented_codes() {
        assert_eq!(status(request_errors(refused("11", "too large"))), "8");
        let deep = "failed%20to%20decode%20Protobuf%20message:%20recursion%20limit%20reached";
        assert_eq!(status(request_errors(refused("13", deep))), "3");
        assert_eq!(
            status(request_errors(refused("13", "signing failed"))),
            "13"
        );
        assert_eq!(status(request_errors(refused("5", "not found"))), "5");
    }
}
