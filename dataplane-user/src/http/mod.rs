//! The agent's HTTP endpoints: kube-proxy-compatible health checks
//! ([`health`]) and Prometheus metrics ([`metrics`]), both served by one
//! small HTTP/1.1 server on hyper. An endpoint is a [`Handler`]: a path in,
//! a status, content type and body out; the server does the protocol
//! (methods, `HEAD`, limits on the request head, timeouts).

pub mod health;
pub mod metrics;
pub mod service_health;

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

/// Largest request head accepted (hyper's minimum buffer); probes and
/// scrapers send a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// A client that does not finish its request head within this is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What an endpoint answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    /// A plain-text reply.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// A JSON reply.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Reply {
            status,
            content_type: "application/json",
            body: format!("{body}\n"),
        }
    }
}

/// One server's endpoints: answers `GET` (and `HEAD`) for a path, the query
/// string already removed.
pub trait Handler: Send + Sync + 'static {
    fn get(&self, path: &str) -> impl Future<Output = Reply> + Send;
}

/// Answers one request: only `GET` and `HEAD`; a `HEAD` gets the headers of
/// the `GET` without the body.
async fn answer<H: Handler>(handler: &H, req: &Request<Incoming>) -> Reply {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let mut reply = handler.get(req.uri().path()).await;
    if req.method() == Method::HEAD {
        reply.body.clear();
    }
    reply
}

/// Serves `handler` on `listener` until the task is aborted; `what` names
/// the server in debug logs.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, what: &'static str) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, for example: wait instead of spinning.
                debug!(server = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let reply = answer(handler.as_ref(), &req).await;
                    let response = hyper::Response::builder()
                        .status(reply.status)
                        .header(hyper::header::CONTENT_TYPE, reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)))
                        .expect("a status and a static header make a valid response");
                    Ok::<_, Infallible>(response)
                }
            });
            // One request per connection, as kube-proxy's health server
            // answers probes: the response closes it, so a client that reads
            // to the end (a probe, `curl`, a shell script) is never held.
            let served = http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                debug!(server = what, %peer, error = %e, "request failed");
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    /// Sends raw `request` bytes on a new connection and returns the status
    /// code and body of the answer (the server closes the connection after
    /// it).
    pub async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .expect("the server answered in time")
            .unwrap();
        let code = out
            .split_ascii_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    /// A `GET` (or another `method`) of `path`, as a kubelet probe sends it
    /// (HTTP/1.1, so keep-alive unless the server closes).
    pub fn request(method: &str, path: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.33\r\n\r\n")
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::{testing::*, *};

    struct Echo;

    impl Handler for Echo {
        async fn get(&self, path: &str) -> Reply {
            Reply::text(StatusCode::OK, format!("{path}\n"))
        }
    }

    async fn echo_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve(listener, Arc::new(Echo), "test")))
    }

    #[tokio::test]
    async fn methods_head_and_query_strings() {
        let (addr, server) = echo_server().await;
        assert_eq!(
            raw(addr, &request("GET", "/readyz?verbose")).await,
            (200, "/readyz\n".into())
        );
        assert_eq!(raw(addr, &request("HEAD", "/readyz")).await, (200, String::new()));
        assert_eq!(raw(addr, &request("POST", "/healthz")).await.0, 405);
        server.abort();
    }

    #[tokio::test]
    async fn a_request_split_over_several_writes_is_answered() {
        let (addr, server) = echo_server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
        // A pause between the two halves, so they arrive as two reads.
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"thz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        server.abort();
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_and_the_connection_closed() {
        let (addr, server) = echo_server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        // No blank line ever: the server must stop reading at MAX_HEAD.
        let junk = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1024));
        let _ = c.write_all(junk.as_bytes()).await;
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the server kept the connection open");
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 431 "),
            "unexpected answer {out:?}"
        );
        server.abort();
    }
}
