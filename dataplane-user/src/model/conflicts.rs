//! Conflicts between Services that claim the same frontend key: the first
//! Service in namespace/name order wins, later claims are reported.

use super::*;

/// One frontend key a Service asks for, in the order it asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub(super) key: ServiceKey,
    /// Shared by the keys of one Service that get the same frontend (a
    /// NodePort on every node address, ...), and with the syncer.
    pub(super) frontend: Arc<Frontend>,
    /// What the key is to the Service, for the conflict message.
    pub(super) what: What,
}

/// What a claimed key is to the Service that claims it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum What {
    ClusterIp,
    ExternalIp,
    NodePort,
    LoadBalancerIp,
}

impl What {
    /// As the conflict message says it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            What::ClusterIp => "clusterIP",
            What::ExternalIp => "externalIP",
            What::NodePort => "nodePort on",
            What::LoadBalancerIp => "load balancer IP",
        }
    }
}

/// One Service's share of the desired state, before conflicts between
/// Services are resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFrontends {
    /// (namespace, name): the conflict order. `None` for an unnamed Service.
    pub(super) order: Option<(String, String)>,
    pub(super) claims: Vec<Claim>,
    pub(super) problems: Vec<Problem>,
}

impl ServiceFrontends {
    /// The problem reported when `claim` loses its key to `winner`.
    fn conflict(&self, claim: &Claim, winner: &str) -> Problem {
        let order = self.order.as_ref().map(|(ns, name)| (ns.as_str(), name.as_str()));
        conflict(order, &claim.key, claim.what, winner)
    }
}

/// The problem reported when the Service `order` loses its claim on `key`
/// (`what` it is to that Service) to `winner`.
pub(super) fn conflict(order: Option<(&str, &str)>, key: &ServiceKey, what: What, winner: &str) -> Problem {
    let what = what.as_str();
    Problem {
        object: match order {
            Some((ns, name)) => format!("Service {ns}/{name}"),
            None => "Service (unnamed)".into(),
        },
        reason: match key.port {
            0 => format!("{what} {} is already used by {winner}; skipped", key.ip()),
            _ => format!(
                "{what} {}:{}/{} is already used by {winner}; skipped",
                key.ip(),
                key.host_port(),
                proto_name(key.proto)
            ),
        },
    }
}

pub(super) fn out(
    order: Option<(String, String)>,
    claims: Vec<Claim>,
    problems: BTreeSet<Problem>,
) -> ServiceFrontends {
    ServiceFrontends {
        order,
        claims,
        problems: problems.into_iter().collect(),
    }
}

/// Merges per-Service results given in (namespace, name) order: the first
/// Service to claim a key gets it, later claims are reported.
pub(super) fn merge<'a>(
    results: impl Iterator<Item = &'a ServiceFrontends>,
    mut problems: BTreeSet<Problem>,
) -> Desired {
    let mut frontends: BTreeMap<ServiceKey, Arc<Frontend>> = BTreeMap::new();
    for r in results {
        problems.extend(r.problems.iter().cloned());
        for c in &r.claims {
            match frontends.get(&c.key) {
                Some(other) => {
                    problems.insert(r.conflict(c, &other.service));
                }
                None => {
                    frontends.insert(c.key, c.frontend.clone());
                }
            }
        }
    }
    Desired {
        frontends,
        problems: problems.into_iter().collect(),
    }
}
