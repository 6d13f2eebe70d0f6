//! Bearer-token authentication and role policies.
//!
//! Handlers take an [`Authorized<P>`] argument, where `P` names the roles allowed; a handler
//! cannot forget the check because it cannot run without the extractor succeeding. Tokens come
//! from `Authorization: Bearer …`. The WebSocket endpoints, and only they, opt in to
//! `?access_token=…` as well (browsers cannot set headers on an upgrade): a route is on
//! [`super::WEBSOCKET_ROUTES`] or it never reads a token from its URL, whatever headers the
//! request carries. Verified tokens are cached briefly so the hot path does not hit the
//! database on every request.
//!
//! The processes' own calls carry credentials of their own, never API tokens, each good for
//! one purpose only and dying with the process that made it ([`ServiceCaller`]): a cluster
//! node's for the other nodes' `/internal/v1` endpoints ([`NodeCredentials`], [`FromNode`]),
//! billing's for its own server's `/insurance/v1` ([`BillingCredential`], [`InsuranceCaller`]).
//! No public route accepts either.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};

use super::error::ApiError;
use crate::domain::auth::{
    BILLING_CREDENTIAL_PREFIX, NODE_CREDENTIAL_PREFIX, Principal, Role, format_credential,
    hash_token, is_service_credential,
};
use crate::persistence::{Db, cluster, tokens};

/// Most cache entries kept before the cache is cleared (bounds memory under a flood of
/// random tokens).
const MAX_CACHE_ENTRIES: usize = 10_000;

/// Requests waiting for a lookup of the same token already under way: each gets its verdict
/// (`None`: the lookup failed, and the request looks the token up itself).
type Waiters = Vec<tokio::sync::oneshot::Sender<Option<Option<Principal>>>>;

/// Verifies tokens against the database, with a short-lived in-memory cache. Concurrent
/// requests with the same uncached token share one lookup: a burst of a hundred requests from
/// one client is one query, not a hundred queued for the pool.
pub struct AuthService {
    db: Db,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<Principal>, Instant)>>,
    in_flight: Mutex<HashMap<String, Waiters>>,
}

/// The lookup of one token hash under way; whoever holds it answers the waiters. Dropped
/// without answering (the request was abandoned), it lets them go to look it up themselves.
struct Lookup<'a> {
    in_flight: &'a Mutex<HashMap<String, Waiters>>,
    hash: &'a str,
    answered: bool,
}

impl Lookup<'_> {
    /// Ends the lookup with `verdict` (`None`: it failed) for every waiter.
    fn answer(mut self, verdict: Option<&Option<Principal>>) {
        self.answered = true;
        for waiter in self.end() {
            let _ = waiter.send(verdict.cloned());
        }
    }

    fn end(&self) -> Waiters {
        self.in_flight
            .lock()
            .ok()
            .and_then(|mut in_flight| in_flight.remove(self.hash))
            .unwrap_or_default()
    }
}

impl Drop for Lookup<'_> {
    fn drop(&mut self) {
        if !self.answered {
            // Dropping the senders tells the waiters to look the token up themselves.
            drop(self.end());
        }
    }
}

impl AuthService {
    /// A service over `db`, caching verdicts for `ttl`.
    pub fn new(db: Db, ttl: Duration) -> Self {
        Self {
            db,
            ttl,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The principal for `token`, or `None` when it is unknown or revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, ApiError> {
        let hash = hash_token(token);
        if let Ok(cache) = self.cache.lock()
            && let Some((principal, at)) = cache.get(&hash)
            && at.elapsed() < self.ttl
        {
            return Ok(principal.clone());
        }
        // Join a lookup of the same token under way, or become the one that looks it up.
        let joined = match self.in_flight.lock() {
            Ok(mut in_flight) => match in_flight.get_mut(&hash) {
                Some(waiters) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    in_flight.insert(hash.clone(), Vec::new());
                    None
                }
            },
            Err(_) => None,
        };
        if let Some(verdict) = joined {
            if let Ok(Some(principal)) = verdict.await {
                return Ok(principal);
            }
            return self.look_up(hash).await;
        }
        let lookup = Lookup {
            in_flight: &self.in_flight,
            hash: &hash,
            answered: false,
        };
        let verdict = self.look_up(hash.clone()).await;
        lookup.answer(verdict.as_ref().ok());
        verdict
    }

    /// Reads `hash`'s token from the database and caches the verdict.
    async fn look_up(&self, hash: String) -> Result<Option<Principal>, ApiError> {
        let now = Instant::now();
        let lookup = hash.clone();
        let principal = self
            .db
            .run(|mut conn| async move { tokens::find_active_by_hash(&mut conn, &lookup).await })
            .await?
            .map(|record| record.principal());
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(hash, (principal.clone(), now));
        }
        Ok(principal)
    }

    /// Forgets every cached verdict (after a revocation through the API).
    pub fn invalidate(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }
}

/// Another process of this deployment, calling with a credential of its own (never an API
/// token): set by [`authenticate`], required by [`FromNode`], accepted by [`InsuranceCaller`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceCaller {
    /// Another node of the cluster (its id), on `/internal/v1/*`.
    Node(String),
    /// This server's own billing, on the insurance calls billing makes.
    Billing,
}

/// A new random secret starting with `prefix` (256 bits, like an API token).
pub fn new_secret(prefix: &str) -> anyhow::Result<String> {
    let mut random = [0_u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format_credential(prefix, &random))
}

/// How many leases after its last heartbeat a node's credential still works: as long as the
/// node counts as alive in `/admin/cluster`. By then its leases have run out and the node, if
/// it still runs, has exited.
const CREDENTIAL_LIVE_LEASES: u32 = 2;

/// Verifies the credentials cluster nodes present to each other. A node's credential is
/// random, made when its process starts, held in memory only, and known to the other nodes as
/// a hash in that node's membership row (`cluster_nodes.credential_hash`). So it works while
/// that process is the live member under its node id, and no longer: not after a graceful
/// leave, not two leases after the last heartbeat (kill -9, a partition), and not once the node
/// was restarted under its id (the row then holds the new process's hash). Nothing is minted in
/// `api_tokens`, so nothing piles up there. Verdicts are cached for a third of a lease, so the
/// readings between nodes (a hot path) do not query the database per request.
pub struct NodeCredentials {
    db: Db,
    live_within_ms: i64,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl NodeCredentials {
    /// A verifier over the membership table of `db`, for a cluster with leases of `lease`.
    pub fn new(db: Db, lease: Duration) -> Self {
        let live = lease.saturating_mul(CREDENTIAL_LIVE_LEASES);
        Self {
            db,
            live_within_ms: i64::try_from(live.as_millis()).unwrap_or(i64::MAX),
            ttl: lease / 3,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The node presenting `credential`, or `None` when no live node does.
    pub async fn verify(&self, credential: &str) -> Result<Option<String>, ApiError> {
        let hash = hash_token(credential);
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((node, at)) = cache.get(&hash)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(node.clone());
        }
        let (lookup, within) = (hash.clone(), self.live_within_ms);
        let node = self
            .db
            .run(move |mut conn| async move {
                cluster::member_by_credential(&mut conn, &lookup, within).await
            })
            .await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(hash, (node.clone(), now));
        }
        Ok(node)
    }
}

/// The credential a server's billing presents to the same server's `/insurance/v1` when no
/// `insurance.api_token` is configured: random, made at start and held in memory only (never
/// stored), so it works on this process alone and dies with it.
pub struct BillingCredential {
    hash: String,
}

impl BillingCredential {
    /// A new credential: its verifier, and the secret to give billing.
    pub fn generate() -> anyhow::Result<(Self, String)> {
        let secret = new_secret(BILLING_CREDENTIAL_PREFIX)?;
        Ok((
            Self {
                hash: hash_token(&secret),
            },
            secret,
        ))
    }

    fn matches(&self, credential: &str) -> bool {
        hash_token(credential) == self.hash
    }
}

/// The process presenting `credential` (a node's or billing's), if this server knows it.
async fn service_caller(
    req: &actix_web::dev::ServiceRequest,
    credential: &str,
) -> Result<Option<ServiceCaller>, ApiError> {
    if credential.starts_with(NODE_CREDENTIAL_PREFIX) {
        let Some(nodes) = req.app_data::<web::Data<NodeCredentials>>().cloned() else {
            return Ok(None);
        };
        return Ok(nodes.verify(credential).await?.map(ServiceCaller::Node));
    }
    Ok(req
        .app_data::<web::Data<BillingCredential>>()
        .filter(|billing| billing.matches(credential))
        .map(|_| ServiceCaller::Billing))
}

/// A set of roles allowed to use an endpoint.
pub trait Policy {
    /// The roles allowed (`admin` also passes wherever `console` does).
    const ROLES: &'static [Role];
}

/// Operators only.
pub struct AdminOnly;
impl Policy for AdminOnly {
    const ROLES: &'static [Role] = &[Role::Admin];
}

/// Dispatchers (and admins).
pub struct ConsoleOnly;
impl Policy for ConsoleOnly {
    const ROLES: &'static [Role] = &[Role::Console];
}

/// Any authenticated caller.
pub struct AnyRole;
impl Policy for AnyRole {
    const ROLES: &'static [Role] = &Role::ALL;
}

/// The caller, authenticated and allowed by policy `P`.
pub struct Authorized<P> {
    /// Who is calling.
    pub principal: Principal,
    _policy: PhantomData<P>,
}

/// The request's token: the `Authorization` header's, or on a WebSocket route (one of
/// [`super::WEBSOCKET_ROUTES`]) being upgraded, the `access_token` query parameter's.
fn bearer_token(req: &HttpRequest) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    if !takes_query_token(req) {
        return None;
    }
    req.query_string()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "access_token")
        .map(|(_, v)| v.to_owned())
}

/// Whether `req` may carry its token in the query string: a `GET` upgrading to a WebSocket on
/// a route that opted in. Compared with the path as sent, so a spelling the router would also
/// accept (percent-encoded letters) gets no token from the URL: refused, never let through.
fn takes_query_token(req: &HttpRequest) -> bool {
    req.method() == actix_web::http::Method::GET
        && super::WEBSOCKET_ROUTES.contains(&req.path())
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Set on requests whose token could not be checked because the database was unreachable.
#[derive(Clone, Copy, Debug)]
struct AuthUnavailable;

/// Middleware: authenticates the bearer token (if any) before routing and extraction, so a
/// missing or wrong credential is answered with 401/403 before the body is even read, and the
/// [`Authorized`] extractor is a synchronous role check.
pub async fn authenticate(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use actix_web::HttpMessage as _;
    let token = bearer_token(req.request()).filter(|t| !t.is_empty());
    // A process's own credential is never looked up as an API token, nor the other way round.
    if let Some(credential) = token.as_deref().filter(|t| is_service_credential(t)) {
        match service_caller(&req, credential).await {
            Ok(Some(caller)) => {
                req.extensions_mut().insert(caller);
            }
            Ok(None) => {}
            Err(_) => {
                req.extensions_mut().insert(AuthUnavailable);
            }
        }
    } else if let Some(token) = token
        && let Some(service) = req.app_data::<web::Data<AuthService>>().cloned()
    {
        match service.authenticate(&token).await {
            Ok(Some(principal)) => {
                req.extensions_mut().insert(principal);
            }
            Ok(None) => {}
            Err(_) => {
                req.extensions_mut().insert(AuthUnavailable);
            }
        }
    }
    next.call(req).await
}

impl<P: Policy + 'static> FromRequest for Authorized<P> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        use actix_web::HttpMessage as _;
        let extensions = req.extensions();
        let result = match extensions.get::<Principal>() {
            Some(principal) if principal.is_allowed(P::ROLES) => Ok(Authorized {
                principal: principal.clone(),
                _policy: PhantomData,
            }),
            Some(principal) => {
                let names: Vec<&str> = P::ROLES.iter().map(|r| r.as_str()).collect();
                Err(ApiError::Forbidden {
                    detail: format!(
                        "role {} may not use this endpoint (allowed: {})",
                        principal.role,
                        names.join(", ")
                    ),
                })
            }
            None if extensions.get::<AuthUnavailable>().is_some() => Err(ApiError::Unavailable {
                detail: "credentials cannot be checked right now; retry shortly".to_owned(),
                retry_after_s: 2,
            }),
            None => Err(ApiError::Unauthorized),
        };
        std::future::ready(result)
    }
}

/// The caller of a node-to-node endpoint (`/internal/v1/*`): another node of this cluster, by
/// its own credential ([`NodeCredentials`]). API tokens, admin ones included, are refused
/// (403); no credential, or one no live node presents, is 401.
pub struct FromNode {
    /// The calling node's id.
    pub node_id: String,
}

impl FromRequest for FromNode {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        use actix_web::HttpMessage as _;
        let extensions = req.extensions();
        let result = match extensions.get::<ServiceCaller>() {
            Some(ServiceCaller::Node(node_id)) => Ok(FromNode {
                node_id: node_id.clone(),
            }),
            Some(ServiceCaller::Billing) => Err(node_only()),
            None if extensions.get::<Principal>().is_some() => Err(node_only()),
            None if extensions.get::<AuthUnavailable>().is_some() => Err(ApiError::Unavailable {
                detail: "credentials cannot be checked right now; retry shortly".to_owned(),
                retry_after_s: 2,
            }),
            None => Err(ApiError::Unauthorized),
        };
        std::future::ready(result)
    }
}

fn node_only() -> ApiError {
    ApiError::Forbidden {
        detail: "a node-to-node endpoint: only the cluster's nodes may call it".to_owned(),
    }
}

/// The caller of the insurance calls billing makes (verify, release a claim): an `admin` token
/// (an operator, or another server's billing with its configured `insurance.api_token`), or
/// this server's own billing by its in-memory credential ([`BillingCredential`]).
pub struct InsuranceCaller;

impl FromRequest for InsuranceCaller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        use actix_web::HttpMessage as _;
        if matches!(
            req.extensions().get::<ServiceCaller>(),
            Some(ServiceCaller::Billing)
        ) {
            return std::future::ready(Ok(InsuranceCaller));
        }
        let admin = Authorized::<AdminOnly>::from_request(req, payload).into_inner();
        std::future::ready(admin.map(|_| InsuranceCaller))
    }
}
