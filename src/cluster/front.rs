//! A cluster node's public server (see [`crate::cluster`]): the probes, `/metrics` and
//! `/admin/cluster` are answered here; every other request, HTTP or WebSocket, is forwarded
//! to the node that owns the dispatch shard and its answer relayed, so any node accepts any
//! request. Validation and every rule stay with the owner's handlers, which see the caller's
//! own credentials; the front only admits what it forwards: a request target that is a path
//! (origin form; `*` and absolute URIs are 400 here), and, but for the public start page, a
//! token it verified itself (401 here otherwise). Nothing a client sends changes what the
//! node believes about its peers: only a connection to the owner that cannot be made marks it
//! suspect.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as Up, client::IntoClientRequest as _};

use super::ClusterState;
use super::devices::NodeDevices;
use crate::actors::broadcaster::Broadcaster;
use crate::actors::device::DeviceRouter;
use crate::config::Settings;
use crate::http::auth::{AdminOnly, AnyRole, AuthService, Authorized, ConsoleOnly};
use crate::http::error::ApiError;
use crate::http::json::{BodyLimit, read_body};
use crate::http::telemetry::{ShersRootSpan, observe};
use crate::http::vitals::GatewayOnly;
use crate::ingest::ingest_with;
use crate::persistence::cluster::{self, HandoverRow, LeaseRow, NodeRow, Owner};
use crate::persistence::{Db, StoreError};

/// What the front's handlers share.
pub struct Front {
    cluster: Arc<ClusterState>,
    db: Db,
    http: reqwest::Client,
    body_limit: usize,
    /// Readings go straight to their device shards from here, not through the dispatch
    /// shard's holder.
    devices: Arc<dyn DeviceRouter>,
    ingest_gate: Arc<tokio::sync::Semaphore>,
    /// The largest gateway WebSocket frame.
    frame_limit: usize,
    /// SSE streams are served from this node's own tail of the event store.
    broadcaster: actix::Addr<Broadcaster>,
    /// Turns true when the node starts handing over: SSE streams end.
    closing: tokio::sync::watch::Receiver<bool>,
}

/// What a node's front serves itself besides forwarding.
pub struct Local {
    /// The node's device shards (readings go straight to them).
    pub devices: Arc<NodeDevices>,
    /// The node's own tail of the event store (SSE).
    pub broadcaster: actix::Addr<Broadcaster>,
    /// Turns true when the node starts handing over.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// Readings in flight on this node, over every transport (HTTP, the buses).
    pub ingest_gate: Arc<tokio::sync::Semaphore>,
}

/// Builds the front server on `listener` (signals are the node's to handle).
pub fn server(
    settings: &Settings,
    db: Db,
    cluster: Arc<ClusterState>,
    local: Local,
    listener: TcpListener,
) -> anyhow::Result<Server> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .context("building the forwarding client")?;
    let front = web::Data::new(Front {
        cluster,
        db: db.clone(),
        http,
        // Room above the owner's own limit, so the owner answers an oversized body with its
        // usual problem.
        body_limit: settings.http.body_limit_bytes.saturating_mul(2),
        devices: local.devices,
        frame_limit: settings.http.body_limit_bytes,
        broadcaster: local.broadcaster,
        closing: local.closing,
        ingest_gate: local.ingest_gate,
    });
    let body_limit = BodyLimit(settings.http.body_limit_bytes);
    // The recorder, from the start: what the front counts before the first scrape counts too.
    let _ = crate::http::telemetry::prometheus();
    let auth = web::Data::new(AuthService::new(
        db,
        Duration::from_secs(settings.auth.cache_ttl_s),
    ));
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(front.clone())
            .app_data(auth.clone())
            .app_data(body_limit)
            .route("/healthz", web::get().to(crate::http::ops::healthz))
            .service(
                web::resource("/api/v1/vitals")
                    .route(web::post().to(vitals))
                    .wrap(from_fn(crate::http::auth::authenticate)),
            )
            .service(
                web::resource("/api/v1/ws/gateway")
                    .route(web::get().to(gateway))
                    .wrap(from_fn(crate::http::auth::authenticate)),
            )
            .service(
                web::resource("/api/v1/events/stream")
                    .route(web::get().to(events_stream))
                    .wrap(from_fn(crate::http::auth::authenticate)),
            )
            .route("/readyz", web::get().to(readyz))
            .service(
                web::resource("/metrics")
                    .route(web::get().to(crate::http::ops::metrics))
                    .wrap(from_fn(crate::http::auth::authenticate)),
            )
            .service(
                web::resource("/admin/cluster")
                    .route(web::get().to(cluster_overview))
                    .wrap(from_fn(crate::http::auth::authenticate)),
            )
            // Verified here, before anything is forwarded (`forward` admits only the public
            // start page without a token).
            .default_service(web::to(forward).wrap(from_fn(crate::http::auth::authenticate)))
            .wrap(from_fn(origin_form_only))
            .wrap(from_fn(observe))
            .wrap(tracing_actix_web::TracingLogger::<ShersRootSpan>::new())
    })
    .disable_signals()
    .shutdown_timeout(settings.http.shutdown_timeout_s)
    .tcp_nodelay(true);
    if let Some(workers) = settings.http.workers {
        server = server.workers(workers.max(1));
    }
    Ok(server.listen(listener)?.run())
}

/// `POST /api/v1/vitals` on a node: the same handler as on a single node, with the batch split
/// over the device shards' holders and answered as one.
async fn vitals(
    _auth: Authorized<GatewayOnly>,
    front: web::Data<Front>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, &mut payload).await?;
    let response = ingest_with(front.devices.as_ref(), &front.ingest_gate, &body).await?;
    Ok(HttpResponse::Ok().json(response))
}

/// `GET /api/v1/ws/gateway` on a node: served here, each frame's readings sent straight to
/// their device shards (not relayed through the dispatch holder).
async fn gateway(
    _auth: Authorized<GatewayOnly>,
    front: web::Data<Front>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    crate::http::vitals::gateway_session(
        front.devices.clone(),
        front.ingest_gate.clone(),
        front.frame_limit,
        front.closing.clone(),
        &req,
        body,
    )
}

/// `GET /api/v1/events/stream` on a node: served from the node's own tail of the event store
/// (woken by every node's commits over Redis), so it goes on through a dispatch handover.
async fn events_stream(
    _auth: Authorized<ConsoleOnly>,
    front: web::Data<Front>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    crate::http::events::sse(&front.db, &front.broadcaster, front.closing.clone(), &req).await
}

/// A node's internal server while it does not hold the dispatch shard: the routes of the
/// device shards it serves (`cluster::internal::node_routes`), for the other nodes only. Anything
/// else is dispatch work sent here by a node whose view of the owners is out of date (this node
/// just lost or was restarted out of the dispatch shard, or has not taken it yet): answered 503
/// with `Retry-After`, never 404, so no client takes it as final.
pub fn node_server(
    settings: &Settings,
    devices: Arc<NodeDevices>,
    listener: TcpListener,
) -> anyhow::Result<Server> {
    let peers = devices.peers();
    let devices = web::Data::from(devices);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(peers.clone())
            .configure(|cfg| super::internal::node_routes(cfg, devices.clone()))
            .default_service(web::to(not_the_dispatch_holder))
            .wrap(from_fn(crate::http::auth::authenticate))
            .wrap(from_fn(observe))
    })
    .disable_signals()
    .shutdown_timeout(settings.http.shutdown_timeout_s)
    .tcp_nodelay(true)
    .workers(settings.http.workers.unwrap_or(2).clamp(1, 4));
    Ok(server.listen(listener)?.run())
}

/// What a node's internal server answers to dispatch work while it does not hold the shard.
async fn not_the_dispatch_holder() -> HttpResponse {
    unavailable("this node does not hold the dispatch shard (handover); retry")
}

/// Whether `uri` is a request target in origin form (`/path?query`): not `*`, not an absolute
/// URI, not an authority.
fn is_origin_form(uri: &actix_web::http::Uri) -> bool {
    uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/')
}

/// Middleware: answers 400 to a request whose target is not a path (`OPTIONS *`, `GET *`,
/// `GET http://host/…`): this server has nothing to say about `*` and forwards nothing but
/// paths.
async fn origin_form_only(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if !is_origin_form(req.uri()) {
        let problem = actix_web::ResponseError::error_response(&ApiError::Malformed {
            detail: "the request target must be a path (origin form), not `*` or an absolute URI"
                .to_owned(),
            errors: Vec::new(),
        });
        return Ok(req.into_response(problem));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Whether `req` may be forwarded without a token: the start page (its data needs one).
fn is_public(req: &HttpRequest) -> bool {
    req.method() == actix_web::http::Method::GET && req.path() == "/"
}

/// The front's readiness: joined the cluster (registered, first lease round done), with who
/// owns dispatch right now. A node is ready while a handover is under way: it answers 503 with
/// `Retry-After` for the few seconds nobody owns the shard.
async fn readyz(front: web::Data<Front>) -> HttpResponse {
    let owner = front.cluster.owner();
    let buses = crate::bus::links();
    let body = serde_json::json!({
        "status": if front.cluster.joined() { "ready" } else { "not_ready" },
        "database": "postgres",
        "node": front.cluster.node_id,
        "dispatch_owner": owner.as_ref().map(|o| &o.node_id),
        "reason": (!front.cluster.joined()).then_some("not joined the cluster yet"),
        "amqp": buses.amqp,
        "mqtt": buses.mqtt,
    });
    if front.cluster.joined() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}

/// `GET /admin/cluster`.
#[derive(Serialize)]
struct Overview {
    /// The node that answered.
    node: String,
    /// Members: address, version, last heartbeat, and the shards each holds.
    nodes: Vec<NodeView>,
    /// Every shard lease with its epoch.
    shards: Vec<LeaseRow>,
    /// The most recent handovers, newest first.
    handovers: Vec<HandoverRow>,
}

#[derive(Serialize)]
struct NodeView {
    #[serde(flatten)]
    node: NodeRow,
    /// Alive: heard from within two leases and not left.
    alive: bool,
    /// Shards this node holds now, with their epochs.
    shards: Vec<HeldShard>,
}

#[derive(Serialize)]
struct HeldShard {
    shard: String,
    epoch: i64,
}

async fn cluster_overview(
    _auth: Authorized<AdminOnly>,
    front: web::Data<Front>,
) -> Result<HttpResponse, ApiError> {
    let (nodes, shards, handovers) = front
        .db
        .run(|mut conn| async move { cluster::overview(&mut conn, 20).await })
        .await
        .map_err(|e: StoreError| ApiError::from(e))?;
    let horizon = chrono::Duration::from_std(front.cluster.lease * 2).unwrap_or_default();
    let now = chrono::Utc::now();
    let nodes = nodes
        .into_iter()
        .map(|node| NodeView {
            alive: node.left_at.is_none() && now - node.heartbeat_at <= horizon,
            shards: shards
                .iter()
                .filter(|l| {
                    // Held by this incarnation (a node restarted under its id holds nothing of
                    // its predecessor's).
                    l.live
                        && l.holder.as_deref() == Some(node.node_id.as_str())
                        && l.holder_instance
                            .as_deref()
                            .is_none_or(|i| i == node.instance)
                })
                .map(|l| HeldShard {
                    shard: l.shard.clone(),
                    epoch: l.epoch,
                })
                .collect(),
            node,
        })
        .collect();
    Ok(HttpResponse::Ok().json(Overview {
        node: front.cluster.node_id.clone(),
        nodes,
        shards,
        handovers,
    }))
}

fn unavailable(detail: &str) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::Unavailable {
        detail: detail.to_owned(),
        retry_after_s: 1,
    })
}

/// Headers that describe one connection, not the message: never relayed.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn is_websocket(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Forwards any other request to the dispatch shard's owner, once its token is verified here
/// (the public start page needs none).
async fn forward(req: HttpRequest, payload: web::Payload, front: web::Data<Front>) -> HttpResponse {
    if !is_public(&req)
        && let Err(refused) = <Authorized<AnyRole> as actix_web::FromRequest>::extract(&req).await
    {
        return actix_web::ResponseError::error_response(&refused);
    }
    let Some(owner) = front.cluster.owner() else {
        front.cluster.refresh_owners();
        return unavailable("no node holds the dispatch shard right now (handover); retry");
    };
    // A path (the front admits nothing else): the owner's URL is this path on its address.
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", actix_web::http::uri::PathAndQuery::as_str);
    let Ok(url) = reqwest::Url::parse(&format!("{}{path}", owner.address)) else {
        return actix_web::ResponseError::error_response(&ApiError::Malformed {
            detail: "the request target is not a valid path".to_owned(),
            errors: Vec::new(),
        });
    };
    metrics::counter!("shers_forwarded_requests_total").increment(1);
    if is_websocket(&req) {
        return forward_websocket(&req, payload, front.clone(), &owner, path).await;
    }
    let body = match payload.to_bytes_limited(front.body_limit).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return actix_web::ResponseError::error_response(&ApiError::PayloadTooLarge {
                limit: front.body_limit / 2,
            });
        }
        Err(_) => return HttpResponse::BadRequest().finish(),
    };
    let Ok(method) = reqwest::Method::from_bytes(req.method().as_str().as_bytes()) else {
        return HttpResponse::MethodNotAllowed().finish();
    };
    let mut upstream = front.http.request(method, url).body(body);
    for (name, value) in req.headers() {
        if !hop_by_hop(name.as_str()) {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    if let Some(peer) = req.peer_addr() {
        upstream = upstream.header("x-forwarded-for", peer.ip().to_string());
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(e) => {
            // Without the URL: its query may carry what the log must not.
            let e = e.without_url();
            tracing::warn!(owner = %owner.node_id, error = %e, "forwarding to the dispatch owner failed");
            // Only a connection that could not be made says the owner may be gone; a request
            // cut off midway (the owner died with it, or closed it) is answered and retried.
            if e.is_connect() {
                front.cluster.suspect_owner(&owner);
            }
            return unavailable(
                "the node holding the dispatch shard did not answer (handover); retry",
            );
        }
    };
    relay(answer).await
}

/// The owner's answer, as ours. Event streams are relayed as they come; anything else whole.
async fn relay(answer: reqwest::Response) -> HttpResponse {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    for (name, value) in answer.headers() {
        if !hop_by_hop(name.as_str()) {
            out.append_header((name.as_str(), value.as_bytes()));
        }
    }
    let streaming = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if streaming {
        let chunks = futures_util::stream::unfold(answer, |mut answer| async move {
            match answer.chunk().await {
                Ok(Some(chunk)) => Some((Ok::<_, actix_web::Error>(chunk), answer)),
                _ => None,
            }
        });
        return out.streaming(chunks);
    }
    match answer.bytes().await {
        Ok(body) => out.body(body),
        Err(_) => unavailable("the dispatch owner's answer was cut off (handover); retry"),
    }
}

/// Connects to the owner's WebSocket endpoint first (so a refusal, e.g. 401, reaches the
/// client as the owner gave it), then upgrades the client and relays frames both ways.
async fn forward_websocket(
    req: &HttpRequest,
    payload: web::Payload,
    front: web::Data<Front>,
    owner: &Owner,
    path: &str,
) -> HttpResponse {
    let headers: Vec<(&'static str, Vec<u8>)> = [
        "authorization",
        "sec-websocket-protocol",
        "origin",
        "user-agent",
    ]
    .into_iter()
    .filter_map(|name| {
        req.headers()
            .get(name)
            .map(|v| (name, v.as_bytes().to_vec()))
    })
    .collect();
    let Some(request) = upstream_request(&owner.address, path, &headers) else {
        return HttpResponse::BadRequest().finish();
    };
    let (upstream, response) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(tungstenite::Error::Http(refused)) => {
            let status =
                StatusCode::from_u16(refused.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = HttpResponse::build(status);
            for (name, value) in refused.headers() {
                if !hop_by_hop(name.as_str()) {
                    out.append_header((name.as_str(), value.as_bytes()));
                }
            }
            return out.body(refused.into_body().unwrap_or_default());
        }
        Err(e) => {
            tracing::warn!(error = %e, "forwarding a WebSocket to the dispatch owner failed");
            if unreachable(&e) {
                front.cluster.suspect_owner(owner);
            }
            return unavailable(
                "the node holding the dispatch shard did not answer (handover); retry",
            );
        }
    };
    let (mut answer, session, stream) = match actix_ws::handle(req, payload) {
        Ok(upgraded) => upgraded,
        Err(e) => return e.error_response(),
    };
    if let Some(protocol) = response.headers().get("sec-websocket-protocol")
        && let Ok(value) = actix_web::http::header::HeaderValue::from_bytes(protocol.as_bytes())
    {
        answer
            .headers_mut()
            .insert(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    // A console follows the event stream: at a handover the front resumes it on the new
    // holder after the last event relayed, and its client sees no break.
    let resume = (req.path() == CONSOLE_PATH).then(|| ConsoleResume {
        front,
        path: path_without_since(path),
        headers,
        last_seq: None,
        subscribe: None,
        swallow_subscribed: false,
    });
    actix_web::rt::spawn(pump(
        session,
        stream.max_frame_size(1 << 20),
        upstream,
        resume,
    ));
    answer
}

/// Whether a WebSocket handshake failed for want of a connection to the owner (not because of
/// anything in the client's request: a refusal, a protocol mismatch).
fn unreachable(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(_))
}

/// The console WebSocket, whose stream the front resumes across a handover.
const CONSOLE_PATH: &str = "/api/v1/ws/console";

/// How long a console's stream waits for a new holder before its client is told to reconnect.
const RESUME_FOR: Duration = Duration::from_secs(30);

/// The handshake for `path` on `owner`, with the client's own credentials and headers.
fn upstream_request(
    owner: &str,
    path: &str,
    headers: &[(&'static str, Vec<u8>)],
) -> Option<tungstenite::handshake::client::Request> {
    let url = format!("ws{}{path}", owner.strip_prefix("http").unwrap_or(owner));
    let mut request = url.as_str().into_client_request().ok()?;
    for (name, value) in headers {
        if let Ok(value) = tungstenite::http::HeaderValue::from_bytes(value) {
            request.headers_mut().insert(*name, value);
        }
    }
    Some(request)
}

/// `path` without its `since` parameter.
fn path_without_since(path: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.starts_with("since="))
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// Which side of a relayed connection went away.
enum Gone {
    Client,
    Owner,
}

/// What a console's stream needs to resume on another node.
struct ConsoleResume {
    front: web::Data<Front>,
    /// The path and query without `since`.
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    /// The last sequence number the client was sent (events and heartbeats carry it).
    last_seq: Option<i64>,
    /// The client's last `subscribe` frame, sent again to the new holder.
    subscribe: Option<String>,
    /// The new holder's answer to that resent `subscribe`, which the client must not see.
    swallow_subscribed: bool,
}

/// The fields of a frame the front looks at.
#[derive(serde::Deserialize)]
struct FrameHead<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    seq: Option<i64>,
}

impl ConsoleResume {
    /// Notes a frame from the client; `subscribe` frames are kept to be resent.
    fn note_client_frame(&mut self, text: &str) {
        if serde_json::from_str::<FrameHead<'_>>(text)
            .is_ok_and(|f| f.kind.as_deref() == Some("subscribe"))
        {
            self.subscribe = Some(text.to_owned());
        }
    }

    /// Notes a frame from the holder; `false` when the client must not get it.
    fn note_owner_frame(&mut self, text: &str) -> bool {
        let Ok(head) = serde_json::from_str::<FrameHead<'_>>(text) else {
            return true;
        };
        if let Some(seq) = head.seq {
            self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        }
        if self.swallow_subscribed && head.kind.as_deref() == Some("subscribed") {
            self.swallow_subscribed = false;
            return false;
        }
        true
    }

    /// Connects to the dispatch shard's holder again, after the last event relayed, and
    /// resends the client's subscription; `None` after [`RESUME_FOR`] without a holder.
    async fn reconnect(&mut self) -> Option<Upstream> {
        let started = std::time::Instant::now();
        while started.elapsed() < RESUME_FOR {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Some(owner) = self.front.cluster.owner() else {
                continue;
            };
            let path = match self.last_seq {
                Some(seq) if self.path.contains('?') => format!("{}&since={seq}", self.path),
                Some(seq) => format!("{}?since={seq}", self.path),
                None => self.path.clone(),
            };
            let request = upstream_request(&owner.address, &path, &self.headers)?;
            let mut upstream = match tokio_tungstenite::connect_async(request).await {
                Ok((upstream, _)) => upstream,
                Err(e) if unreachable(&e) => {
                    self.front.cluster.suspect_owner(&owner);
                    continue;
                }
                // Not the holder (any more): look again.
                Err(tungstenite::Error::Http(answer)) if answer.status().is_server_error() => {
                    self.front.cluster.refresh_owners();
                    continue;
                }
                // The new holder refused the client (its token was revoked meanwhile, say):
                // the client reconnects and hears why itself.
                Err(_) => return None,
            };
            if let Some(subscribe) = &self.subscribe {
                if upstream.send(Up::text(subscribe.clone())).await.is_err() {
                    continue;
                }
                self.swallow_subscribed = true;
            }
            metrics::counter!("shers_console_streams_resumed_total").increment(1);
            return Some(upstream);
        }
        None
    }
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Relays frames between the client and the owner until either side closes. When the owner
/// goes away (a handover), a console's stream is resumed on the new holder (`resume`); any
/// other client is closed with 1012 "service restart" so it reconnects.
async fn pump(
    mut client: actix_ws::Session,
    mut from_client: actix_ws::MessageStream,
    upstream: Upstream,
    mut resume: Option<ConsoleResume>,
) {
    use actix_ws::Message as Down;
    let (mut to_owner, mut from_owner) = upstream.split();
    loop {
        let owner_gone = tokio::select! {
            frame = from_client.next() => {
                let relayed = match frame {
                    Some(Ok(Down::Text(text))) => {
                        if let Some(resume) = resume.as_mut() {
                            resume.note_client_frame(&text);
                        }
                        Up::text(text.to_string())
                    }
                    Some(Ok(Down::Binary(bytes))) => Up::binary(bytes),
                    Some(Ok(Down::Ping(bytes))) => Up::Ping(bytes),
                    Some(Ok(Down::Pong(bytes))) => Up::Pong(bytes),
                    Some(Ok(Down::Close(reason))) => {
                        let frame = reason.map(|r| tungstenite::protocol::CloseFrame {
                            code: u16::from(r.code).into(),
                            reason: r.description.unwrap_or_default().into(),
                        });
                        let _ = to_owner.send(Up::Close(frame)).await;
                        return;
                    }
                    Some(Ok(Down::Continuation(_) | Down::Nop)) => continue,
                    Some(Err(_)) | None => {
                        let _ = to_owner.send(Up::Close(None)).await;
                        return;
                    }
                };
                to_owner.send(relayed).await.is_err()
            }
            frame = from_owner.next() => {
                let relayed = match frame {
                    Some(Ok(Up::Text(text))) => {
                        if resume.as_mut().is_some_and(|r| !r.note_owner_frame(text.as_str())) {
                            continue;
                        }
                        client.text(text.as_str().to_owned()).await.map_err(|_| Gone::Client)
                    }
                    Some(Ok(Up::Binary(bytes))) => client.binary(bytes).await.map_err(|_| Gone::Client),
                    Some(Ok(Up::Ping(bytes))) => client.ping(&bytes).await.map_err(|_| Gone::Client),
                    Some(Ok(Up::Pong(bytes))) => client.pong(&bytes).await.map_err(|_| Gone::Client),
                    // The holder is handing over: a console resumes elsewhere.
                    Some(Ok(Up::Close(Some(frame))))
                        if resume.is_some() && frame.code == CloseCode::Restart =>
                    {
                        Err(Gone::Owner)
                    }
                    Some(Ok(Up::Close(frame))) => {
                        let reason = frame.map(|f| actix_ws::CloseReason {
                            code: u16::from(f.code).into(),
                            description: Some(f.reason.as_str().to_owned()).filter(|d| !d.is_empty()),
                        });
                        let _ = client.close(reason).await;
                        return;
                    }
                    Some(Ok(Up::Frame(_))) => continue,
                    Some(Err(_)) | None => Err(Gone::Owner),
                };
                match relayed {
                    Ok(()) => false,
                    Err(Gone::Client) => {
                        let _ = to_owner.send(Up::Close(None)).await;
                        return;
                    }
                    Err(Gone::Owner) => true,
                }
            }
        };
        if owner_gone {
            let resumed = match resume.as_mut() {
                Some(resume) => resume.reconnect().await,
                None => None,
            };
            match resumed {
                Some(upstream) => (to_owner, from_owner) = upstream.split(),
                None => {
                    let _ = client.close(Some(restarting())).await;
                    return;
                }
            }
        }
    }
}

fn restarting() -> actix_ws::CloseReason {
    actix_ws::CloseReason {
        code: actix_ws::CloseCode::Restart,
        description: Some("dispatch is moving to another node; reconnect".to_owned()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::is_origin_form;

    #[test]
    fn only_paths_are_origin_form() {
        for target in ["/", "/api/v1/units?limit=5", "//twice"] {
            assert!(is_origin_form(&target.parse().unwrap()), "{target}");
        }
        for target in ["*", "http://example.org/api/v1/units", "example.org:443"] {
            assert!(!is_origin_form(&target.parse().unwrap()), "{target}");
        }
    }
}
