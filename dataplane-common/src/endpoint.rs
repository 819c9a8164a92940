//! The endpoint set: the (address, port, protocol) of every backend of the
//! programmed frontends, for host routing of socket-level connections.
//!
//! A socket the cgroup programs translated at `connect()` (or `sendmsg()`)
//! sends its packets to the backend's address: the TC program finds no
//! Service in them. With host routing and socket-level load balancing both
//! on ([`SOCK_ROUTING_GLOBAL`](crate::SOCK_ROUTING_GLOBAL)), a packet of
//! no Service whose destination (or, for a reply, whose source) is in this
//! set is host-routed like a translated one.

use bytemuck::{Pod, Zeroable};

use crate::*;

/// Key of the endpoint set (`map_names::ENDPOINTS`; the value is a `u8`,
/// always 1): one backend of some programmed frontend, as its packets
/// carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct EndpointKey {
    /// The backend's address (the family's zeros after an IPv4 one).
    pub addr: Addr,
    /// The backend's port, network byte order.
    pub port: u16,
    /// The frontend's protocol (`IPPROTO_*`).
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6` (never with `KEY_IN_CLUSTER`).
    pub family: u8,
}

impl EndpointKey {
    /// The key of `backend` of a frontend keyed `frontend` (its protocol
    /// and family).
    #[inline(always)]
    pub const fn of(frontend: &ServiceKey, backend: &Backend) -> Self {
        EndpointKey {
            addr: backend.addr,
            port: backend.port,
            proto: frontend.proto,
            family: frontend.family & !KEY_IN_CLUSTER,
        }
    }
}
