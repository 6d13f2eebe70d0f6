//! Bearer-token authentication and role policies.
//!
//! Handlers take an [`Authorized<P>`] argument, where `P` names the roles allowed; a handler
//! cannot forget the check because it cannot run without the extractor succeeding. Tokens come
//! from `Authorization: Bearer …`. The WebSocket endpoints, and only they, opt in to
//! `?access_token=…` as well (browsers cannot set headers on an upgrade): a route is on
//! [`super::WEBSOCKET_ROUTES`] or it never reads a token from its URL, whatever headers the
//! request carries. Verified tokens are cached briefly so the hot path does not hit the
//! database on every request.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};

use super::error::ApiError;
use crate::domain::auth::{Principal, Role, hash_token};
use crate::persistence::{Db, tokens};

/// Most cache entries kept before the cache is cleared (bounds memory under a flood of
/// random tokens).
const MAX_CACHE_ENTRIES: usize = 10_000;

/// Verifies tokens against the database, with a short-lived in-memory cache.
pub struct AuthService {
    db: Db,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<Principal>, Instant)>>,
}

impl AuthService {
    /// A service over `db`, caching verdicts for `ttl`.
    pub fn new(db: Db, ttl: Duration) -> Self {
        Self {
            db,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The principal for `token`, or `None` when it is unknown or revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, ApiError> {
        let hash = hash_token(token);
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((principal, at)) = cache.get(&hash)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(principal.clone());
        }
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
    if let Some(token) = bearer_token(req.request()).filter(|t| !t.is_empty())
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
