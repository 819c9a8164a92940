//! Health endpoints, like kube-proxy's on port 10256:
//!
//! - `GET /healthz`: 200 while the sync loop runs, else 503;
//! - `GET /readyz`: 503 until the first full sync is programmed, then 200.

use std::sync::Arc;

use hyper::StatusCode;
use tokio::net::TcpListener;

use super::{Handler, Reply};
use crate::state::AgentState;

/// The health endpoints of one agent.
pub struct Health(pub Arc<AgentState>);

impl Handler for Health {
    async fn get(&self, path: &str) -> Reply {
        respond(path, &self.0)
    }
}

/// The answer for `path`.
pub fn respond(path: &str, state: &AgentState) -> Reply {
    let (status, body) = match path {
        "/healthz" if state.is_alive() => (StatusCode::OK, "ok\n"),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "sync loop not running\n"),
        "/readyz" if state.is_ready() => (StatusCode::OK, "ok\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "first sync not programmed yet\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    Reply::text(status, body)
}

/// Serves the health endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    super::serve(listener, Arc::new(Health(state)), "health").await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::http::testing::raw;

    async fn get(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
        raw(addr, request).await
    }

    #[tokio::test]
    async fn healthz_and_readyz_follow_the_agent_state() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AgentState::default());
        let server = tokio::spawn(serve(listener, state.clone()));
        let req = |p: &str| crate::http::testing::request("GET", p);

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
        assert_eq!(
            get(addr, &crate::http::testing::request("POST", "/healthz")).await.0,
            405
        );
        let (code, body) = get(addr, &crate::http::testing::request("HEAD", "/readyz")).await;
        assert_eq!((code, body.as_str()), (200, ""));
        server.abort();
    }
}
