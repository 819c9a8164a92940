//! The agent's HTTP endpoints: kube-proxy-compatible health checks and
//! Prometheus metrics.

pub mod health;
pub mod metrics;
