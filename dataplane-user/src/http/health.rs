//! Health endpoints, like kube-proxy's on port 10256 (its
//! `pkg/proxy/healthcheck/proxy_health.go`):
//!
//! - `GET /healthz`: 200 while the sync loop runs and this node is
//!   eligible (not being deleted, not tainted
//!   `ToBeDeletedByClusterAutoscaler`), else 503; a JSON body with
//!   `lastUpdated`, `currentTime` and `nodeEligible`. Cloud load balancers
//!   probe it to choose nodes for `externalTrafficPolicy: Cluster` Services.
//! - `GET /livez`: the same without the node's eligibility (a node being
//!   drained is not a reason to restart the agent).
//! - `GET /readyz`: 503 until the first full sync is programmed, then 200.

use std::sync::{atomic::Ordering, Arc};

use hyper::StatusCode;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
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
    let status = |ok: bool| match ok {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let now = Timestamp::now();
    // As kube-proxy: while healthy, lastUpdated is the current time.
    let last = |healthy: bool| match (healthy, state.last_sync_ms.load(Ordering::Relaxed)) {
        (true, _) => now.to_string(),
        (false, 0) => String::new(),
        (false, ms) => Timestamp::from_millisecond(ms as i64).map_or(String::new(), |t| t.to_string()),
    };
    match path {
        "/healthz" => {
            let eligible = state.node_eligible();
            let healthy = state.is_alive() && eligible;
            let body = json!({"lastUpdated": last(healthy), "currentTime": now.to_string(), "nodeEligible": eligible});
            Reply::json(status(healthy), &body)
        }
        "/livez" => {
            let healthy = state.is_alive();
            let body = json!({"lastUpdated": last(healthy), "currentTime": now.to_string()});
            Reply::json(status(healthy), &body)
        }
        "/readyz" if state.is_ready() => Reply::text(StatusCode::OK, "ok\n"),
        "/readyz" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "first sync not programmed yet\n"),
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the health endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    super::serve(listener, Arc::new(Health(state)), "health").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::raw;

    async fn get(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
        raw(addr, request).await
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    }

    #[tokio::test]
    async fn healthz_livez_and_readyz_follow_the_agent_state() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AgentState::default());
        let server = tokio::spawn(serve(listener, state.clone()));
        let req = |p: &str| crate::http::testing::request("GET", p);

        // Before the loop runs: neither alive nor ready.
        assert_eq!(get(addr, &req("/healthz")).await.0, 503);
        assert_eq!(get(addr, &req("/livez")).await.0, 503);
        assert_eq!(get(addr, &req("/readyz")).await.0, 503);

        // Loop running, first sync not applied yet.
        state.alive.store(true, Ordering::Relaxed);
        let (code, body) = get(addr, &req("/healthz")).await;
        assert_eq!(code, 200);
        assert_eq!(json(&body)["nodeEligible"], true, "{body}");
        assert!(
            json(&body)["currentTime"]
                .as_str()
                .is_some_and(|t| t.parse::<Timestamp>().is_ok()),
            "{body}"
        );
        assert_eq!(get(addr, &req("/livez")).await.0, 200);
        let (code, body) = get(addr, &req("/readyz")).await;
        assert_eq!(code, 503);
        assert!(body.contains("first sync"), "{body}");

        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/readyz")).await, (200, "ok\n".into()));
        assert_eq!(get(addr, &req("/readyz?verbose")).await.0, 200);

        // The Node is being deleted: /healthz says so, /livez does not care.
        state.node_ineligible.store(true, Ordering::Relaxed);
        let (code, body) = get(addr, &req("/healthz")).await;
        assert_eq!((code, &json(&body)["nodeEligible"]), (503, &json!(false)), "{body}");
        assert_eq!(get(addr, &req("/livez")).await.0, 200);
        state.node_ineligible.store(false, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/healthz")).await.0, 200);

        // Loop ended (e.g. the source failed for good).
        state.alive.store(false, Ordering::Relaxed);
        assert_eq!(get(addr, &req("/healthz")).await.0, 503);
        assert_eq!(get(addr, &req("/livez")).await.0, 503);

        assert_eq!(get(addr, &req("/metrics")).await.0, 404);
        assert_eq!(
            get(addr, &crate::http::testing::request("POST", "/healthz")).await.0,
            405
        );
        let (code, body) = get(addr, &crate::http::testing::request("HEAD", "/readyz")).await;
        assert_eq!((code, body.as_str()), (200, ""));
        server.abort();
    }

    /// kube-proxy's node eligibility (`ProxyHealthServer.SyncNode`).
    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        use k8s_openapi::api::core::v1::Node;
        let node = |yaml: &str| -> Node { serde_yaml_ng::from_str(yaml).unwrap() };
        assert!(crate::model::node_eligible(&node("metadata: {name: n}")));
        let other_taint =
            "metadata: {name: n}\nspec: {taints: [{key: node.kubernetes.io/unschedulable, effect: NoSchedule}]}";
        assert!(crate::model::node_eligible(&node(other_taint)));
        let autoscaler = "metadata: {name: n}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]}";
        assert!(!crate::model::node_eligible(&node(autoscaler)));
        let deleting = "metadata: {name: n, deletionTimestamp: \"2026-12-05T09:00:00Z\"}";
        assert!(!crate::model::node_eligible(&node(deleting)));
    }
}
