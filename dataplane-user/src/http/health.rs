//! Health endpoints, like kube-proxy's on port 10256:
//!
//! - `GET /healthz`: 200 while the sync loop runs, else 503;
//! - `GET /readyz`: 503 until the first full sync is programmed, then 200.
//!
//! Two fixed answers do not need an HTTP stack: this reads one request head
//! (bounded in size and time), answers, and closes the connection.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::state::AgentState;

/// Longest request head read; probes send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// A client that does not finish its request head within this is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, for example: wait instead of spinning.
                debug!(error = %e, "health endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &state).await {
                debug!(%peer, error = %e, "health endpoint: request failed");
            }
        });
    }
}

/// Status code and body for a request line.
pub fn respond(request_line: &str, state: &AgentState) -> (u16, &'static str) {
    let mut parts = request_line.split_ascii_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, "bad request\n");
    };
    if method != "GET" && method != "HEAD" {
        return (405, "method not allowed\n");
    }
    // Probes may add a query string (`/readyz?verbose`); it changes nothing.
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/healthz" if state.is_alive() => (200, "ok\n"),
        "/healthz" => (503, "sync loop not running\n"),
        "/readyz" if state.is_ready() => (200, "ok\n"),
        "/readyz" => (503, "first sync not programmed yet\n"),
        _ => (404, "not found\n"),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    }
}

/// Reads one request head (bounded in size and time) and returns its
/// request line.
pub(crate) async fn read_request_line(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let head_end = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 512];
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(i);
            }
            if buf.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too long"));
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed before the request head ended"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::other("request head not received in time"))??;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    Ok(head.lines().next().unwrap_or("").to_string())
}

/// Writes a complete response and closes the connection.
pub(crate) async fn write_response(
    conn: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reason(code),
        body.len(),
        if head_only { "" } else { body }
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

async fn handle(mut conn: TcpStream, state: &AgentState) -> std::io::Result<()> {
    let line = read_request_line(&mut conn).await?;
    let (code, body) = respond(&line, state);
    let head_only = line.starts_with("HEAD ");
    write_response(&mut conn, code, "text/plain; charset=utf-8", body, head_only).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// Sends `request` to the server and returns the status code and body.
    async fn get(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .expect("the health server answered in time")
            .unwrap();
        let code = out
            .split_ascii_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    #[tokio::test]
    async fn healthz_and_readyz_follow_the_agent_state() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AgentState::default());
        let server = tokio::spawn(serve(listener, state.clone()));
        let req = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.33\r\n\r\n");

        // Before the loop runs: neither alive nor ready.
        assert_eq!(get(addr, &req("/healthz")).await.0, 503);
        assert_eq!(get(addr, &req("/readyz")).await.0, 503);

        // Loop running, first sync not applied yet.
        state.alive.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/healthz")).await, (200, "ok\n".into()));
        let (code, body) = get(addr, &req("/readyz")).await;
        assert_eq!(code, 503);
        assert!(body.contains("first sync"), "{body}");

        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/readyz")).await, (200, "ok\n".into()));
        assert_eq!(get(addr, &req("/readyz?verbose")).await.0, 200);

        // Loop ended (e.g. the source failed for good).
        state.alive.store(false, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/healthz")).await.0, 503);

        assert_eq!(get(addr, &req("/metrics")).await.0, 404);
        assert_eq!(get(addr, "POST /healthz HTTP/1.1\r\n\r\n").await.0, 405);
        let (code, body) = get(addr, "HEAD /readyz HTTP/1.1\r\n\r\n").await;
        assert_eq!((code, body.as_str()), (200, ""));
        server.abort();
    }

    #[tokio::test]
    async fn a_request_split_over_several_writes_is_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AgentState::default());
        state.alive.store(true, Ordering::Relaxed);
        let server = tokio::spawn(serve(listener, state));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
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
    async fn an_oversized_head_is_dropped_without_an_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(AgentState::default())));
        let mut c = TcpStream::connect(addr).await.unwrap();
        // No blank line ever: the server must stop reading at MAX_HEAD.
        let junk = vec![b'a'; MAX_HEAD + 1024];
        let _ = c.write_all(&junk).await;
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the server kept the connection open");
        assert!(out.is_empty(), "unexpected answer {:?}", String::from_utf8_lossy(&out));
        server.abort();
    }
}
