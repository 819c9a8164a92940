//! One HTTP server per `healthCheckNodePort` ([`crate::model::HealthCheck`]),
//! as kube-proxy's `service_health.go`: any `GET` answers 200 when this node
//! has a local ready endpoint of the Service and the agent is healthy, else
//! 503, with the body
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":B}`.
//! The set of ports follows every sync: new ones are opened, removed ones
//! closed, counts updated. A port that cannot be opened (in use) is named
//! in the returned errors and tried again at the next sync.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use hyper::StatusCode;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{Handler, Reply};
use crate::{model::HealthCheck, state::AgentState};

/// The answer of one Service's health-check port.
struct ServiceHealth {
    namespace: String,
    name: String,
    local_endpoints: Arc<AtomicUsize>,
    state: Arc<AgentState>,
}

impl Handler for ServiceHealth {
    async fn get(&self, _path: &str) -> Reply {
        let count = self.local_endpoints.load(Ordering::Relaxed);
        let healthy = self.state.is_alive();
        let status = match count > 0 && healthy {
            true => StatusCode::OK,
            false => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = json!({
            "service": {"namespace": self.namespace, "name": self.name},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        });
        Reply::json(status, &body)
    }
}

struct Instance {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// The health-check servers of every Service that has one.
pub struct HealthCheckServers {
    bind: IpAddr,
    state: Arc<AgentState>,
    running: BTreeMap<(String, String), Instance>,
}

impl HealthCheckServers {
    /// Servers listening on `bind` (kube-proxy: every address, 0.0.0.0).
    pub fn new(bind: IpAddr, state: Arc<AgentState>) -> Self {
        HealthCheckServers {
            bind,
            state,
            running: BTreeMap::new(),
        }
    }

    /// The ports served now, by `namespace/name`.
    pub fn ports(&self) -> BTreeMap<String, u16> {
        let named = self.running.iter().map(|((ns, n), i)| (format!("{ns}/{n}"), i.port));
        named.collect()
    }

    /// Makes the servers match `checks`; returns what could not be opened.
    pub async fn sync(&mut self, checks: &[HealthCheck]) -> Vec<String> {
        let wanted: BTreeMap<(String, String), &HealthCheck> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c))
            .collect();
        let gone: Vec<(String, String)> = self
            .running
            .iter()
            .filter(|(key, i)| wanted.get(*key).is_none_or(|c| c.port != i.port))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let i = self.running.remove(&key).expect("listed above");
            tracing::info!(service = %format!("{}/{}", key.0, key.1), port = i.port, "closing health-check port");
            i.task.abort();
            // The listener is closed once the task is dropped: wait for
            // it, so the port is free (for another Service) on return.
            let _ = i.task.await;
        }
        let mut errors = Vec::new();
        for (key, check) in wanted {
            if let Some(i) = self.running.get(&key) {
                i.local_endpoints.store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let addr = SocketAddr::new(self.bind, check.port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!(
                        "Service {}/{}: cannot serve healthCheckNodePort {} on {addr}: {e}; trying again at the next sync",
                        key.0, key.1, check.port
                    ));
                    continue;
                }
            };
            tracing::info!(service = %format!("{}/{}", key.0, key.1), %addr, "serving health-check port");
            let local_endpoints = Arc::new(AtomicUsize::new(check.local_endpoints));
            let handler = Arc::new(ServiceHealth {
                namespace: key.0.clone(),
                name: key.1.clone(),
                local_endpoints: local_endpoints.clone(),
                state: self.state.clone(),
            });
            let task = tokio::spawn(super::serve(listener, handler, "health check"));
            let port = check.port;
            self.running.insert(
                key,
                Instance {
                    port,
                    local_endpoints,
                    task,
                },
            );
        }
        errors
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for i in self.running.values() {
            i.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::http::testing::{raw, request};

    fn check(name: &str, port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "shop".into(),
            name: name.into(),
            port,
            local_endpoints,
        }
    }

    /// A free port on 127.0.0.1 (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn ports_open_answer_and_close_with_the_syncs() {
        let state = Arc::new(AgentState::default());
        state.alive.store(true, Ordering::Relaxed);
        let mut servers = HealthCheckServers::new("127.0.0.1".parse().unwrap(), state.clone());
        let (p1, p2) = (free_port(), free_port());
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert!(servers
            .sync(&[check("web", p1, 2), check("api", p2, 0)])
            .await
            .is_empty());
        let (code, body) = raw(at(p1), &request("GET", "/")).await;
        assert_eq!(code, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(
            raw(at(p2), &request("GET", "/anything")).await.0,
            503,
            "no local endpoint"
        );

        // Counts follow the syncs; an unhealthy agent answers 503 anyway.
        assert!(servers
            .sync(&[check("web", p1, 0), check("api", p2, 1)])
            .await
            .is_empty());
        assert_eq!(raw(at(p1), &request("GET", "/")).await.0, 503);
        assert_eq!(raw(at(p2), &request("GET", "/")).await.0, 200);
        state.alive.store(false, Ordering::Relaxed);
        let (code, body) = raw(at(p2), &request("GET", "/")).await;
        assert_eq!(code, 503);
        assert!(body.contains(r#""serviceProxyHealthy":false"#), "{body}");
        state.alive.store(true, Ordering::Relaxed);

        // A Service gone: its port closes.
        assert!(servers.sync(&[check("api", p2, 1)]).await.is_empty());
        let closed = std::net::TcpStream::connect(at(p1));
        assert!(closed.is_err(), "port {p1} still open");
        assert_eq!(servers.ports(), BTreeMap::from([("shop/api".to_string(), p2)]));

        // A port in use is an error naming the Service and the port, and
        // is tried again at the next sync.
        let taken = std::net::TcpListener::bind(at(p1)).unwrap();
        let errors = servers.sync(&[check("api", p2, 1), check("web", p1, 1)]).await;
        assert!(
            errors.len() == 1 && errors[0].contains("shop/web") && errors[0].contains(&p1.to_string()),
            "{errors:?}"
        );
        drop(taken);
        assert!(servers
            .sync(&[check("api", p2, 1), check("web", p1, 1)])
            .await
            .is_empty());
        assert_eq!(raw(at(p1), &request("GET", "/")).await.0, 200);
    }
}
