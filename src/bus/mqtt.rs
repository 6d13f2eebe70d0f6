//! MQTT: wearables and gateways publishing to a broker (docs/interop.md §2).
//!
//! - `<prefix>/<device_id>/vitals` (QoS 1): anything `POST /api/v1/vitals` accepts, the topic's
//!   device being the identity (a reading naming another device is refused). The message is
//!   acknowledged (PUBACK) only once its readings are applied, or refused for good.
//! - `<prefix>/<device_id>/status`: `offline` records `device.offline` at once
//!   ([`DeviceRouter::report_offline`]); `online` is counted and otherwise ignored.
//! - Refusals go to `<prefix>/<device_id>/error` as the problem+json SHERS answers over HTTP
//!   (with the JSON pointers): one per refused reading, also when the rest of its batch was
//!   applied. They are acknowledged: a refusal is never redelivered.
//! - A transient failure (ingest at capacity, a device's state not stored, a shard moving) is
//!   held unacknowledged and retried with back-off, never published as a refusal; the broker's
//!   in-flight window (Mosquitto's `max_inflight_messages`) bounds how many are held.
//!
//! SHERS subscribes with a persistent session (`clean_session` false, a stable client id) and
//! shared subscriptions (`$share/shers/<prefix>/+/vitals`, `…/status`), so the nodes of a
//! cluster split the load and nothing acknowledged is lost when the broker or SHERS restarts.
//! The connection comes back with jittered back-off and counts in
//! [`mqtt_link`] for `/readyz`. Payloads hold patient data: they are never
//! logged, only reason labels and JSON pointers.
//!
//! [`DeviceRouter::report_offline`]: crate::actors::device::DeviceRouter::report_offline

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::task::JoinSet;

use super::amqp::{Backoff, pause};
use super::{IngestDeps, mqtt_link};
use crate::config::MqttSettings;
use crate::domain::ids::DeviceId;
use crate::domain::validation::{FieldError, valid_external_id};
use crate::http::error::ApiError;
use crate::ingest::{Expect, IngestError, Rejected, UnknownDevices, ingest};

/// The shared-subscription group every SHERS node joins.
pub const SHARE_GROUP: &str = "shers";

/// The largest MQTT packet SHERS reads (MQTT's own limit): a bigger one would end the
/// connection and come back forever. Payloads over `http.body_limit_bytes` are refused
/// (413 on the error topic); the broker's `max_packet_size` is the operator's bound.
const MAX_INCOMING_PACKET: usize = 268_435_455;
/// The largest packet SHERS sends (an error problem is a few hundred bytes).
const MAX_OUTGOING_PACKET: usize = 1024 * 1024;
/// Requests (acknowledgements, error publications) queued for the connection.
const REQUEST_QUEUE: usize = 256;
/// How long in-flight messages may take to finish when the process stops.
const DRAIN: Duration = Duration::from_secs(5);

/// What a topic under the prefix carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `<prefix>/<device_id>/vitals`: readings.
    Vitals,
    /// `<prefix>/<device_id>/status`: `online` / `offline`.
    Status,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Vitals => "vitals",
            Self::Status => "status",
        }
    }
}

/// The topics of a deployment configured with `mqtt.topic_prefix`.
#[derive(Clone, Debug)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// The topics under `prefix` (already validated: no wildcards, no slash at either end).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// `$share/shers/<prefix>/+/vitals`.
    pub fn vitals_filter(&self) -> String {
        format!("$share/{SHARE_GROUP}/{}/+/vitals", self.prefix)
    }

    /// `$share/shers/<prefix>/+/status`.
    pub fn status_filter(&self) -> String {
        format!("$share/{SHARE_GROUP}/{}/+/status", self.prefix)
    }

    /// `<prefix>/<device_id>/error`: where a device's refusals go.
    pub fn error_topic(&self, device_id: &str) -> String {
        format!("{}/{device_id}/error", self.prefix)
    }

    /// The device and kind of a topic SHERS subscribed to; `None` when it names no valid
    /// device (the id rules of `POST /api/v1/devices`).
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, Kind)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (device, kind) = rest.rsplit_once('/')?;
        let kind = match kind {
            "vitals" => Kind::Vitals,
            "status" => Kind::Status,
            _ => return None,
        };
        valid_external_id(device).then_some((device, kind))
    }
}

/// Starts the MQTT ingest on its own task, reconnecting until the process closes. Payloads
/// over `body_limit` bytes (HTTP's `http.body_limit_bytes`) are refused.
pub fn spawn_ingest(settings: MqttSettings, body_limit: usize, deps: IngestDeps) {
    tokio::spawn(run(settings, body_limit, deps));
}

/// What every message's task shares.
struct Shared {
    deps: IngestDeps,
    topics: Topics,
    client: AsyncClient,
    body_limit: usize,
}

async fn run(settings: MqttSettings, body_limit: usize, deps: IngestDeps) {
    let mut link = mqtt_link().want();
    let client_id = settings
        .client_id
        .clone()
        .unwrap_or_else(|| format!("shers-{}", deps.node_name));
    let options = match options(&settings, &client_id) {
        Ok(options) => options,
        Err(e) => {
            tracing::error!(error = %e, "MQTT ingest: not started");
            return;
        }
    };
    let (client, mut events) = AsyncClient::new(options, REQUEST_QUEUE);
    let topics = Topics::new(&settings.topic_prefix);
    let filters = vec![
        SubscribeFilter::new(topics.vitals_filter(), QoS::AtLeastOnce),
        SubscribeFilter::new(topics.status_filter(), QoS::AtLeastOnce),
    ];
    let mut closing = deps.closing.clone();
    let shared = Arc::new(Shared {
        deps,
        topics,
        client: client.clone(),
        body_limit,
    });
    let mut backoff = Backoff::new();
    // The messages being applied on this connection.
    let mut held: JoinSet<()> = JoinSet::new();
    tracing::info!(client_id = %client_id, "MQTT ingest: connecting");
    loop {
        while held.try_join_next().is_some() {}
        let event = tokio::select! {
            event = events.poll() => event,
            _ = closing.wait_for(|c| *c) => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                // Subscribed again on every connection: a broker that lost the session (no
                // persistence) has no subscription left; one that kept it replaces it.
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::warn!(error = %e, "MQTT ingest: subscription not sent");
                }
                tracing::info!(
                    session_present = ack.session_present,
                    "MQTT ingest: connected"
                );
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                link.set_up(granted);
                if granted {
                    tracing::info!(prefix = %settings.topic_prefix, "MQTT ingest: subscribed");
                } else {
                    tracing::error!(
                        prefix = %settings.topic_prefix,
                        "MQTT ingest: the broker refused the subscriptions (its ACL must let SHERS's user read <prefix>/+/vitals and <prefix>/+/status)"
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                held.spawn(handle(shared.clone(), publish));
            }
            Ok(_) => {}
            Err(e) => {
                link.set_up(false);
                // Not acknowledged on this connection: the broker redelivers them to the
                // session, and a reading applied twice changes nothing.
                held.abort_all();
                metrics::counter!("shers_mqtt_disconnects_total").increment(1);
                tracing::warn!(error = %e, "MQTT ingest: no connection to the broker; reconnecting");
                if pause(backoff.next_wait(), &mut closing).await {
                    break;
                }
            }
        }
    }
    drain(&client, &mut events, held).await;
}

/// The process is stopping: new messages are left unacknowledged (the broker redelivers them
/// to this session, or to another node), the ones in flight finish (up to [`DRAIN`]; a held
/// one gives up at once), their acknowledgements are sent, and the session is left.
async fn drain(client: &AsyncClient, events: &mut rumqttc::EventLoop, mut held: JoinSet<()>) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            joined = held.join_next() => if joined.is_none() { break },
            event = events.poll() => if event.is_err() { return },
        }
    }
    held.abort_all();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(event) = events.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

/// The connection options: `mqtt.url` (credentials percent-decoded), the client id, a
/// persistent session, manual acknowledgements, and TLS on rustls for `mqtts://`.
fn options(settings: &MqttSettings, client_id: &str) -> anyhow::Result<MqttOptions> {
    let Some(raw) = &settings.url else {
        anyhow::bail!("mqtt.url is not set");
    };
    // The parser's errors do not echo the URL (it may hold a password).
    let url = url::Url::parse(raw.expose()).context("mqtt.url is not a URL")?;
    let tls = match url.scheme() {
        "mqtt" => false,
        "mqtts" => true,
        _ => anyhow::bail!("mqtt.url must start with mqtt:// or mqtts://"),
    };
    let host = url
        .host_str()
        .context("mqtt.url names no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if !url.username().is_empty() {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
        };
        let user = decode(url.username()).context("mqtt.url: the user is not UTF-8")?;
        let password = decode(url.password().unwrap_or_default())
            .context("mqtt.url: the password is not UTF-8")?;
        options.set_credentials(user, password);
    }
    if tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(settings.ca_file.as_deref())?),
        )));
    }
    Ok(options)
}

/// A rustls client trusting the platform's roots (with any private CA installed there),
/// Mozilla's, and those in `ca_file` (`mqtt.ca_file`).
fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading mqtt.ca_file {}", path.display()))?
        {
            let cert =
                cert.with_context(|| format!("a certificate in mqtt.ca_file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in mqtt.ca_file {}", path.display()))?;
        }
    }
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A certificate the platform holds but rustls cannot use is skipped, not fatal.
        let _ = roots.add(cert);
    }
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS for mqtts://")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

/// Applies one message and acknowledges it, unless it is held when the process stops or the
/// connection goes.
async fn handle(shared: Arc<Shared>, publish: Publish) {
    let done = match shared.topics.parse(&publish.topic) {
        None => {
            metrics::counter!("shers_mqtt_rejected_total", "reason" => "bad_topic").increment(1);
            tracing::warn!(
                reason = "bad_topic",
                "MQTT ingest: acknowledged a message whose topic names no valid device"
            );
            true
        }
        Some((device, Kind::Vitals)) => vitals(&shared, device, &publish.payload).await,
        Some((device, Kind::Status)) => status(&shared, device, &publish.payload).await,
    };
    if done && let Err(e) = shared.client.ack(&publish).await {
        // The connection is gone: the broker redelivers the message to this session.
        tracing::debug!(error = %e, "MQTT ingest: acknowledgement lost");
    }
}

/// A message's readings, applied; `false` when it is still held as the process stops.
async fn vitals(shared: &Shared, device: &str, payload: &[u8]) -> bool {
    let deps = &shared.deps;
    if payload.len() > shared.body_limit {
        refuse_body(
            shared,
            device,
            "invalid_body",
            "/",
            ApiError::PayloadTooLarge {
                limit: shared.body_limit,
            },
        )
        .await;
        return true;
    }
    let mut wait = Duration::from_millis(100);
    let mut closing = deps.closing.clone();
    loop {
        let expect = Expect {
            unknown: UnknownDevices::Refuse,
            device: Some(device),
        };
        match ingest(deps.devices.as_ref(), &deps.gate, payload, expect).await {
            Ok(answer) => {
                metrics::counter!("shers_mqtt_consumed_total", "kind" => Kind::Vitals.label())
                    .increment(1);
                for refused in answer.rejected {
                    refuse_reading(shared, device, refused).await;
                }
                return true;
            }
            Err(IngestError::Body(e)) => {
                let pointer = e.pointer().to_owned();
                let problem = ApiError::from(IngestError::Body(e));
                refuse_body(shared, device, "invalid_body", &pointer, problem).await;
                return true;
            }
            Err(IngestError::Refused(rejected)) => {
                for refused in rejected {
                    refuse_reading(shared, device, refused).await;
                }
                return true;
            }
            Err(e @ (IngestError::AtCapacity | IngestError::Unavailable)) => {
                tracing::debug!(error = %e, "MQTT ingest: transient failure; retrying");
                if pause(wait, &mut closing).await {
                    return false;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A status message, applied; `false` when it is still held as the process stops.
async fn status(shared: &Shared, device: &str, payload: &[u8]) -> bool {
    let said = std::str::from_utf8(payload)
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match said.as_str() {
        // An empty retained message only clears the retained status.
        "" if payload.is_empty() => true,
        "online" => {
            metrics::counter!("shers_mqtt_consumed_total", "kind" => Kind::Status.label())
                .increment(1);
            true
        }
        "offline" => {
            let mut wait = Duration::from_millis(100);
            let mut closing = shared.deps.closing.clone();
            loop {
                let id = DeviceId(device.to_owned());
                match shared.deps.devices.report_offline(id).await {
                    Ok(recorded) => {
                        metrics::counter!("shers_mqtt_consumed_total", "kind" => Kind::Status.label())
                            .increment(1);
                        tracing::debug!(
                            device.id = %device,
                            recorded,
                            "MQTT ingest: the device said it is offline"
                        );
                        return true;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "MQTT ingest: offline status not recorded yet; retrying");
                        if pause(wait, &mut closing).await {
                            return false;
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        _ => {
            let problem = ApiError::fields(vec![FieldError::new(
                "",
                "a status is `online` or `offline`",
            )]);
            refuse_body(shared, device, "invalid_body", "", problem).await;
            true
        }
    }
}

/// One refused reading: counted, logged by reason and pointers, and published to the device's
/// error topic as a 422 problem.
async fn refuse_reading(shared: &Shared, device: &str, refused: Rejected) {
    let reason = refused.reason.label();
    metrics::counter!("shers_mqtt_rejected_total", "reason" => reason).increment(1);
    let pointers: Vec<&str> = refused.errors.iter().map(|e| e.pointer.as_str()).collect();
    tracing::warn!(
        reason,
        index = refused.index,
        pointers = ?pointers,
        "MQTT ingest: refused a reading"
    );
    publish_problem(shared, device, ApiError::fields(refused.errors)).await;
}

/// A message refused as a whole: counted, logged, and published to the device's error topic.
async fn refuse_body(
    shared: &Shared,
    device: &str,
    reason: &'static str,
    pointer: &str,
    problem: ApiError,
) {
    metrics::counter!("shers_mqtt_rejected_total", "reason" => reason).increment(1);
    tracing::warn!(reason, pointer, "MQTT ingest: refused a message");
    publish_problem(shared, device, problem).await;
}

/// Publishes `problem` (problem+json) to the device's error topic, QoS 1, not retained.
async fn publish_problem(shared: &Shared, device: &str, problem: ApiError) {
    let body = match serde_json::to_vec(&problem.problem()) {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(error = %e, "MQTT ingest: a problem could not be encoded");
            return;
        }
    };
    let topic = shared.topics.error_topic(device);
    if let Err(e) = shared
        .client
        .publish(topic, QoS::AtLeastOnce, false, body)
        .await
    {
        tracing::debug!(error = %e, "MQTT ingest: a refusal was not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_prefix_and_name_their_device() {
        let topics = Topics::new("shers/devices");
        assert_eq!(
            topics.vitals_filter(),
            "$share/shers/shers/devices/+/vitals"
        );
        assert_eq!(
            topics.status_filter(),
            "$share/shers/shers/devices/+/status"
        );
        assert_eq!(topics.error_topic("w-1"), "shers/devices/w-1/error");
        assert_eq!(
            topics.parse("shers/devices/w-1/vitals"),
            Some(("w-1", Kind::Vitals))
        );
        assert_eq!(
            topics.parse("shers/devices/w-1/status"),
            Some(("w-1", Kind::Status))
        );
        for bad in [
            "shers/devices//vitals",
            "shers/devices/w 1/vitals",
            "shers/devices/w-1/error",
            "shers/devices/a/b/vitals",
            "shers/devicesX/w-1/vitals",
            "other/w-1/vitals",
            &format!("shers/devices/{}/vitals", "x".repeat(129)),
        ] {
            assert_eq!(topics.parse(bad), None, "{bad}");
        }
    }

    fn settings(url: &str) -> MqttSettings {
        MqttSettings {
            url: Some(crate::config::Secret::new(url.to_owned())),
            ..MqttSettings::default()
        }
    }

    #[test]
    fn the_url_gives_host_port_credentials_and_a_persistent_session() {
        let o = options(&settings("mqtt://shers:p%40ss%3Aw@broker:1884"), "shers-a")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.broker_address(), ("broker".to_owned(), 1884));
        assert_eq!(o.client_id(), "shers-a");
        assert!(!o.clean_session());
        let login = o.credentials().unwrap_or_else(|| panic!("no credentials"));
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("shers", "p@ss:w")
        );
        let o = options(&settings("mqtts://broker"), "shers-a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.broker_address().1, 8883);
        assert!(matches!(o.transport(), Transport::Tls(_)));
        let o = options(&settings("mqtt://[::1]"), "x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.broker_address(), ("::1".to_owned(), 1883));
        assert!(options(&settings("http://broker"), "x").is_err());
    }
}
