//! Who may call what on a gRPC server. Each server declares a [`Policy`]: which roles may call
//! each service or method; anything it does not name is refused (default deny). The
//! [`AuthorizeLayer`] checks every call against it before the call reaches a handler, from
//! the identity the connection's client certificate named (see [`crate::tls`]). A call
//! without a certificate is `UNAUTHENTICATED`; a certificate naming no identity, or an
//! identity the policy does not allow, is `PERMISSION_DENIED`. Refusals change nothing and
//! are counted in `ptt_grpc_refused_total{reason, role}`.
//!
//! A handler that must also check *which* media node is calling (a node may only register,
//! heartbeat, drain and deregister its own id) uses [`require_node`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::tls::{Identity, PeerKind};

/// What the connection proved about its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The server runs without TLS (`--insecure-plaintext`): every caller is trusted.
    Plaintext,
    /// TLS without a client certificate.
    Anonymous,
    /// A client certificate that does not chain to the CA (or has expired).
    Untrusted,
    /// A certificate from the CA that names no Talkgroup identity.
    Unnamed,
    Identified(Identity),
}

/// The connection info every request carries in its extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    pub auth: Auth,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
    role: &'static str,
}

/// The count of refused connections and calls, by reason and the caller's role.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    refused: Family<RefusalLabels, Counter>,
}

impl Refusals {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the counter to a service's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ptt_grpc_refused",
            "gRPC connections and calls refused by mutual TLS or the authorisation policy, by \
             reason (handshake, unauthenticated, permission_denied) and the caller's role",
            self.refused.clone(),
        );
    }

    pub fn handshake(&self) {
        self.count("handshake", "none");
    }

    /// A connection without a trusted client certificate closed because the server or its
    /// source holds as many as allowed.
    pub fn anonymous(&self) {
        self.count("anonymous-limit", "none");
    }

    fn count(&self, reason: &'static str, role: &'static str) {
        self.refused
            .get_or_create(&RefusalLabels { reason, role })
            .inc();
    }

    /// The refusals counted for `reason`, over every role (for tests and logs).
    pub fn total(&self, reason: &str) -> u64 {
        let mut total = 0;
        for role in ["none", "gateway", "state", "admin", "media"] {
            if let Some(counter) = self.refused.get(&RefusalLabels {
                reason: reason_label(reason),
                role,
            }) {
                total += counter.get();
            }
        }
        total
    }

    /// Counts and builds the refusal of a call.
    pub fn refuse(&self, refusal: Refusal, auth: Option<&Auth>) -> tonic::Status {
        let role = match auth {
            Some(Auth::Identified(identity)) => role_label(identity.kind()),
            _ => "none",
        };
        match refusal {
            Refusal::Unauthenticated => {
                self.count("unauthenticated", role);
                tonic::Status::unauthenticated("a client certificate is required")
            }
            Refusal::PermissionDenied => {
                self.count("permission_denied", role);
                tonic::Status::permission_denied("this identity may not make this call")
            }
        }
    }
}

fn reason_label(reason: &str) -> &'static str {
    match reason {
        "handshake" => "handshake",
        "unauthenticated" => "unauthenticated",
        _ => "permission_denied",
    }
}

fn role_label(role: PeerKind) -> &'static str {
    match role {
        PeerKind::Gateway => "gateway",
        PeerKind::State => "state",
        PeerKind::Admin => "admin",
        PeerKind::Media => "media",
    }
}

/// Why a call is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated,
    PermissionDenied,
}

/// Which roles may call which paths. A path ending in `/` is a whole service
/// (`/ptt.state.v1.FloorService/`); otherwise one method (`/ptt.state.v1.ChannelService/Watch`).
/// The health service is open to every authenticated caller.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<(String, &'static [PeerKind])>,
}

const EVERY_ROLE: &[PeerKind] = &[
    PeerKind::Gateway,
    PeerKind::State,
    PeerKind::Admin,
    PeerKind::Media,
];

impl Default for Policy {
    fn default() -> Self {
        Self::new().allow("/grpc.health.v1.Health/", EVERY_ROLE)
    }
}

impl Policy {
    /// A policy that allows nothing, not even health checks.
    pub fn new() -> Self {
        Self { rules: Vec::new() }
    }

    /// Allows `roles` to call `path`.
    #[must_use]
    pub fn allow(mut self, path: impl Into<String>, roles: &'static [PeerKind]) -> Self {
        self.rules.push((path.into(), roles));
        self
    }

    /// Opens reflection to every authenticated caller (it is only served when enabled).
    #[must_use]
    pub fn with_reflection(self) -> Self {
        self.allow("/grpc.reflection.v1.ServerReflection/", EVERY_ROLE)
            .allow("/grpc.reflection.v1alpha.ServerReflection/", EVERY_ROLE)
    }

    /// Whether `auth` may call `path`.
    pub fn check(&self, auth: Option<&Auth>, path: &str) -> Result<(), Refusal> {
        let identity = match auth {
            Some(Auth::Plaintext) => return Ok(()),
            None | Some(Auth::Anonymous | Auth::Untrusted) => return Err(Refusal::Unauthenticated),
            Some(Auth::Unnamed) => return Err(Refusal::PermissionDenied),
            Some(Auth::Identified(identity)) => identity,
        };
        let role = identity.kind();
        let allowed = self.rules.iter().any(|(rule, roles)| {
            let matches = if rule.ends_with('/') {
                path.starts_with(rule.as_str())
            } else {
                path == rule
            };
            matches && roles.contains(&role)
        });
        if allowed {
            Ok(())
        } else {
            Err(Refusal::PermissionDenied)
        }
    }
}

/// Checks every call against a [`Policy`] (`Server::builder().layer(...)`).
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    policy: Arc<Policy>,
    refusals: Refusals,
}

impl AuthorizeLayer {
    pub fn new(policy: Policy, refusals: Refusals) -> Self {
        Self {
            policy: Arc::new(policy),
            refusals,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: Arc::clone(&self.policy),
            refusals: self.refusals.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    policy: Arc<Policy>,
    refusals: Refusals,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<http::Response<R>, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let auth = request.extensions().get::<Peer>().map(|p| &p.auth);
        match self.policy.check(auth, request.uri().path()) {
            Ok(()) => futures::future::Either::Right(self.inner.call(request)),
            Err(refusal) => {
                let status = self.refusals.refuse(refusal, auth);
                tracing::debug!(
                    path = request.uri().path(),
                    caller = ?auth,
                    code = ?status.code(),
                    "call refused"
                );
                futures::future::Either::Left(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The caller's identity, if the connection named one.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    match request.extensions().get::<Peer>().map(|p| &p.auth) {
        Some(Auth::Identified(identity)) => Some(identity),
        _ => None,
    }
}

/// Refuses a call about media node `node_id` unless the caller is that node (or the server
/// runs in plaintext, where every caller is trusted). Admins act on nodes through the admin
/// service, not through this one.
pub fn require_node<T>(
    request: &tonic::Request<T>,
    node_id: &str,
    refusals: &Refusals,
) -> Result<(), tonic::Status> {
    let auth = request.extensions().get::<Peer>().map(|p| &p.auth);
    match auth {
        Some(Auth::Plaintext) => Ok(()),
        Some(Auth::Identified(Identity::Media(node))) if node == node_id => Ok(()),
        Some(Auth::Identified(_)) | Some(Auth::Unnamed) => {
            Err(refusals.refuse(Refusal::PermissionDenied, auth))
        }
        None | Some(Auth::Anonymous | Auth::Untrusted) => {
            Err(refusals.refuse(Refusal::Unauthenticated, auth))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &[PeerKind] = &[PeerKind::Gateway];

    fn who(identity: Identity) -> Auth {
        Auth::Identified(identity)
    }

    #[test]
    fn default_deny_with_services_and_methods() {
        let policy = Policy::default()
            .allow("/ptt.state.v1.FloorService/", GATEWAY)
            .allow(
                "/ptt.state.v1.ChannelService/Watch",
                &[PeerKind::Gateway, PeerKind::Media],
            );
        let gw = who(Identity::Gateway);
        let node = who(Identity::Media("n1".into()));
        let admin = who(Identity::Admin);
        assert_eq!(
            policy.check(Some(&gw), "/ptt.state.v1.FloorService/AcquireFloor"),
            Ok(())
        );
        assert_eq!(
            policy.check(Some(&node), "/ptt.state.v1.FloorService/AcquireFloor"),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(
            policy.check(Some(&node), "/ptt.state.v1.ChannelService/Watch"),
            Ok(())
        );
        assert_eq!(
            policy.check(Some(&node), "/ptt.state.v1.ChannelService/WatchX"),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(
            policy.check(Some(&admin), "/ptt.admin.v1.AdminService/ListChannels"),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(
            policy.check(Some(&admin), "/grpc.health.v1.Health/Check"),
            Ok(())
        );
        assert_eq!(
            policy.check(Some(&Auth::Anonymous), "/grpc.health.v1.Health/Check"),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(policy.check(None, "/x/y"), Err(Refusal::Unauthenticated));
        assert_eq!(
            policy.check(Some(&Auth::Unnamed), "/grpc.health.v1.Health/Check"),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(
            policy.check(Some(&Auth::Plaintext), "/anything/at/all"),
            Ok(())
        );
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let refusals = Refusals::new();
        let status = refusals.refuse(Refusal::PermissionDenied, Some(&who(Identity::Gateway)));
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let status = refusals.refuse(Refusal::Unauthenticated, None);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        refusals.handshake();
        assert_eq!(refusals.total("permission_denied"), 1);
        assert_eq!(refusals.total("unauthenticated"), 1);
        assert_eq!(refusals.total("handshake"), 1);
    }
}
